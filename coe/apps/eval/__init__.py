"""Batch evaluation: many strategies (single experts, best single, routers x aggregators,
random-k, oracle) over one question set, each generation made once and shared; scoring with
confidence intervals, cost and active parameters; a markdown/JSON/plot report; replay records.

Sits on top of the orchestrator: nothing outside ``coe.apps.eval`` (but the CLI) imports it."""
