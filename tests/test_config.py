"""Config: defaults, YAML + overrides, one-line errors naming field and value."""

from __future__ import annotations

import pytest

from raysage.config import FIELDS, build_config, load_config, write_yaml
from raysage.errors import ConfigError


def test_defaults_are_the_papers_fsl_sage_parameters():
    cfg = load_config()
    assert cfg.algorithm == "fsl_sage"
    p = cfg.params
    assert (p.server_update_interval, p.align_interval, p.align_epochs,
            p.align_batch_size, p.align_buffer, p.align_blocking) == (5, 10, 100, 1000, 1000, True)
    assert (cfg.client_lr, cfg.client_weight_decay, cfg.params.aux_weight_decay) == (1e-3, 1e-4, 0.0)


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("clients: 7\nalpha: 0.1\npartition: dirichlet\nalign_blocking: false\n")
    cfg = load_config(path, clients=9, seed=None)
    assert cfg.clients == 9            # flag beats file
    assert cfg.alpha == 0.1 and cfg.partition == "dirichlet" and cfg.params.align_blocking is False
    assert cfg.seed == FIELDS["seed"].default    # None means "not given"


def test_cli_strings_are_coerced():
    cfg = build_config({"clients": "12", "client_lr": "0.05", "align_blocking": "no",
                        "gpus_per_worker": "0.25", "out": "none"})
    assert (cfg.clients, cfg.client_lr, cfg.params.align_blocking, cfg.gpus_per_worker, cfg.out) == \
        (12, 0.05, False, 0.25, None)


@pytest.mark.parametrize("field,value,words", [
    ("alpha", -1, ["'alpha'", "-1", "greater than 0"]),
    ("clients", 0, ["'clients'", "at least 1"]),
    ("clients", 2.5, ["'clients'", "2.5", "int"]),
    ("participation", 1.5, ["'participation'", "at most 1"]),
    ("algorithm", "sgd", ["'algorithm'", "'sgd'", "fsl_sage", "fedavg"]),
    ("partition", "zipf", ["'partition'", "iid", "dirichlet", "shards"]),
    ("align_blocking", "maybe", ["'align_blocking'", "bool"]),
    ("client_lr", "nan", ["'client_lr'", "float"]),
])
def test_bad_values_name_field_value_and_allowed(field, value, words):
    with pytest.raises(ConfigError) as err:
        build_config({field: value})
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_unknown_field_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="unknown config field 'clinets'"):
        build_config({"clinets": 3})
    bad = tmp_path / "bad.yaml"
    bad.write_text("clients: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listy)
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="--data-dir"):
        build_config({"dataset": "cifar10"})
    with pytest.raises(ConfigError, match="gpus_per_worker"):
        build_config({"gpus_per_worker": 1.5})
    with pytest.raises(ConfigError, match="both 0"):
        build_config({"cpus_per_worker": 0, "gpus_per_worker": 0})


def test_a_worker_trains_a_client_per_cpu_each_with_one_torch_thread():
    default = build_config({})
    assert (default.cpus_per_worker, default.worker_threads, default.torch_threads) == (2, 2, 1)
    assert (build_config({"cpus_per_worker": 0.5}).worker_threads,
            build_config({"cpus_per_worker": 0.5}).torch_threads) == (1, 1)
    four = build_config({"cpus_per_worker": 4, "client_threads": 2})
    assert (four.worker_threads, four.torch_threads) == (2, 2)
    assert build_config({"cpus_per_worker": 2, "threads": 3}).torch_threads == 3
    # A GPU worker trains one client at a time, with all its CPUs behind it.
    gpu = build_config({"gpus_per_worker": 0.25, "cpus_per_worker": 2})
    assert (gpu.worker_threads, gpu.torch_threads) == (1, 2)


def test_an_algorithms_parameters_are_its_own_section():
    cfg = build_config({"algorithm": "sglr", "sglr_alpha": "0.25"})
    assert cfg.params.sglr_alpha == 0.25 and not hasattr(cfg.params, "align_interval")
    assert cfg.to_dict()["sglr"] == {"sglr_alpha": 0.25, "sglr_phi": 0.5}
    # Flat parameters of another algorithm do not apply (one spec, several algorithms).
    assert build_config({"algorithm": "sglr", "align_interval": 3}).params == cfg.params.__class__(
        sglr_alpha=0.5)
    # Nested under the algorithm's name, as config.yaml writes them; flags win; another
    # algorithm's section is that algorithm's business.
    nested = build_config({"fsl_sage": {"align_interval": 4, "align_epochs": 2},
                           "sglr": {"sglr_alpha": 1.0}}, {"align_epochs": 7})
    assert (nested.params.align_interval, nested.params.align_epochs) == (4, 7)


def test_config_yaml_round_trips_with_the_section(tmp_path):
    cfg = build_config({"algorithm": "cse_fsl", "server_update_interval": 3, "clients": 4})
    path = tmp_path / "config.yaml"
    path.write_text(write_yaml(cfg))
    section = path.read_text().split("cse_fsl:\n")[1]
    assert "  server_update_interval: 3\n" in section and "  aux_lr: 0.001\n" in section
    again = load_config(path)
    assert again == cfg and again.to_dict() == cfg.to_dict()


@pytest.mark.parametrize("values, words", [
    ({"align_interval": 0}, ["'align_interval'", "at least 1"]),
    ({"algorithm": "sglr", "sglr_phi": 1}, ["'sglr_phi'", "below 1"]),
    ({"aux_init": "random"}, ["'aux_init'", "shared", "per_client"]),
    ({"fedprox": {"mu": 1}}, ["section 'fedprox'", "fsl_sage"]),
    ({"fsl_sage": {"align_intervall": 2}}, ["unknown config field 'align_intervall'"]),
])
def test_bad_algorithm_parameters_are_one_line(values, words):
    with pytest.raises(ConfigError) as err:
        build_config(values)
    assert "\n" not in str(err.value)
    for word in words:
        assert word in str(err.value)


def test_algorithms_never_import_the_config_so_there_is_no_import_circle():
    """config resolves algorithms by name; algorithms must not import config back, not
    even lazily inside a function (every import statement counts)."""
    import ast
    from pathlib import Path

    package = Path(__file__).resolve().parents[1] / "raysage"

    def imported(path: Path) -> set[str]:
        parts = path.relative_to(package.parent).with_suffix("").parts
        here = ".".join(parts[:-1] if path.name == "__init__.py" else parts[:-1])
        if path.name == "__init__.py":
            here = ".".join(parts[:-1])
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = here
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                name = (f"{base}.{node.module}" if node.module else base) if node.level \
                    else node.module
                found.add(name)
                found |= {f"{name}.{alias.name}" for alias in node.names}
            elif isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
        return found

    modules = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if path.name == "__init__.py" else parts)
        modules[name] = path
    edges = {name: {m for m in imported(path) if m in modules and m != name}
             for name, path in modules.items()}
    start = [m for m in modules if m.startswith("raysage.algorithms")]
    seen, stack = set(), list(start)
    while stack:
        module = stack.pop()
        if module in seen:
            continue
        seen.add(module)
        stack += edges[module]
    reached = {m: [d for d in edges[m] if d == "raysage.config"] for m in seen}
    assert "raysage.config" not in seen, {m: d for m, d in reached.items() if d}
    assert "raysage.algorithms" in edges["raysage.config"]     # the one direction
