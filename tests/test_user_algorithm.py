"""An algorithm written in one file outside the package, through simulate, sweep and report;
and the engine's checks of the contract."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from raysage.cli import app
from raysage.config import build_config
from raysage.engine.orchestrator import simulate
from raysage.errors import ConfigError, ContractError

QUIET = {"announce": lambda line: None}
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "topk_splitfed.py"
TINY = dict(clients=3, samples_per_client=20, batch_size=10, rounds=2, test_samples=40,
            backend="serial", seed=3)

FEDPROX = '''
"""FedProx (Li et al. 2020) on the split model: FedAvg plus mu/2 ||w - w_t||^2."""
from pydantic import Field

from raysage.algorithms.base import TRAIN_LOSS, Algorithm, ClientRoundPlan, Keeps, Metric, Section
from raysage.algorithms.fedavg import MODEL_DOWN, MODEL_UP
from raysage.algorithms.state import load_state, to_state
from raysage.lazy import nn
from raysage.models import split_loss


class ProxParams(Section):
    mu: float = Field(0.01, ge=0.0, description="weight of the proximal term")


class FedProx(Algorithm):
    name = "fedprox"
    label = "FedProx"
    colour = "#000000"
    description = "FedAvg with a proximal term"
    Params = ProxParams
    byte_kinds = (MODEL_DOWN, MODEL_UP)
    metrics = (TRAIN_LOSS, Metric("proximal", "the proximal term, per step"))
    aggregated = ("client", "server")
    client_keeps = Keeps(optimizers=("full",))
    has_server = False

    def plan_client_round(self, rnd, p):
        whole = self.sizes.client + self.sizes.server
        return ClientRoundPlan(p.cid, download={"client_model_down": whole},
                               forward_flops=[self.costs.full_step * b for b in p.batch_sizes],
                               backward_flops=[0.0] * len(p.batch_sizes), exchanges={},
                               upload={"client_model_up": whole})

    def build_client(self, client):
        model = self.place(nn.Sequential(self.arch.make_client(), self.arch.make_server()))
        client.models["full"] = model
        client.optimizers["full"] = self.client_optimizer(model)

    def client_round(self, client, rnd):
        model, optimizer = client.models["full"], client.optimizers["full"]
        load_state(model[0], client.start["client"])
        load_state(model[1], client.start["server"])
        anchor = [p.detach().clone() for p in model.parameters()]
        for step in client.steps():
            loss = split_loss(model(step.x), step.y)
            client.log("train_loss", loss.item(), len(step.y))
            proximal = sum((p - a).pow(2).sum() for p, a in zip(model.parameters(), anchor))
            client.log("proximal", proximal.item())
            optimizer.zero_grad()
            (loss + self.params.mu / 2 * proximal).backward()
            optimizer.step()
        return {"client": to_state(model[0]), "server": to_state(model[1])}

    def eval_model(self, server, global_state):
        model = self._eval_part("full", self.arch.make_full)
        load_state(model[0], global_state["client"])
        load_state(model[1], global_state["server"])
        return model
'''


@pytest.fixture
def fedprox(tmp_path) -> str:
    path = tmp_path / "algos" / "fedprox.py"
    path.parent.mkdir()
    path.write_text(FEDPROX)
    return f"{path}:FedProx"


def test_an_algorithm_from_a_file_runs_with_its_own_parameters_and_columns(tmp_path, fedprox):
    prox = simulate(build_config(TINY, {"algorithm": fedprox, "mu": 0.5,
                                        "out": str(tmp_path / "prox")}), **QUIET)
    assert prox.summary["label"] == "FedProx"
    rounds = pq.read_table(tmp_path / "prox" / "rounds.parquet").to_pylist()
    clients = pq.read_table(tmp_path / "prox" / "clients.parquet").to_pylist()
    # Its metric is a column (0 at a client's first step, then positive: the mean is > 0),
    # its byte kinds are the only byte columns.
    assert all(r["proximal"] > 0 for r in rounds) and all(c["proximal"] > 0 for c in clients)
    assert {"client_model_down", "client_model_up"} <= set(rounds[0])
    assert "smashed_up" not in rounds[0]
    saved = (tmp_path / "prox" / "config.yaml").read_text()
    assert "fedprox:\n  mu: 0.5" in saved
    # With mu = 0 it is FedAvg, to the bit.
    zero = simulate(build_config(TINY, {"algorithm": fedprox, "mu": 0,
                                        "out": str(tmp_path / "zero")}), **QUIET)
    fedavg = simulate(build_config(TINY, {"algorithm": "fedavg",
                                          "out": str(tmp_path / "fedavg")}), **QUIET)
    for a, b in zip(zero.rounds, fedavg.rounds, strict=True):
        for column in ("accuracy", "test_loss", "train_loss", "total_bytes", "sim_time"):
            assert a[column] == b[column], column
    assert zero.rounds[-1]["accuracy"] != prox.rounds[-1]["accuracy"] or \
        zero.rounds[-1]["test_loss"] != prox.rounds[-1]["test_loss"]


def test_the_example_through_simulate_sweep_and_report_on_the_command_line(tmp_path):
    runner = CliRunner()
    algorithm = f"{EXAMPLE}:TopKSplitFed"
    run = runner.invoke(app, ["simulate", "--algorithm", algorithm, "--topk", "0.25",
                              *[f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()],
                              "--out", str(tmp_path / "one")])
    assert run.exit_code == 0, run.output
    rows = pq.read_table(tmp_path / "one" / "rounds.parquet").to_pylist()
    # 8 * 8 * 32 = 2048 gradient entries per sample; a quarter of them as value + index.
    assert rows[0]["sparse_grad_down"] == 3 * 20 * 512 * 8
    assert 0.25 < rows[0]["kept_energy"] < 1 and rows[0]["sparsified_batches"] == 6

    sweep = runner.invoke(app, ["sweep", "--grid", f"algorithm=splitfed_v2,{algorithm}",
                                "--topk", "0.25", "--align-interval", "2",
                                *[f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()],
                                "--out", str(tmp_path / "sweep")])
    assert sweep.exit_code == 0, sweep.output
    report = runner.invoke(app, ["report", str(tmp_path / "sweep"), "--out",
                                 str(tmp_path / "report")])
    assert report.exit_code == 0, report.output
    text = (tmp_path / "report" / "report.md").read_text()
    assert "SplitFed top-k" in text and "SplitFed v2" in text
    summary = json.loads(next((tmp_path / "sweep").glob("*topk*/summary.json")).read_text())
    assert summary["label"] == "SplitFed top-k"


def test_a_users_algorithm_on_ray_workers_equals_serial(tmp_path, ray_session):
    fields = TINY | {"algorithm": f"{EXAMPLE}:TopKSplitFed", "clients": 4}
    serial = simulate(build_config(fields, {"out": str(tmp_path / "serial")}), **QUIET)
    on_ray = simulate(build_config(fields, {"backend": "ray", "workers": 2,
                                            "cpus_per_worker": 0.5,
                                            "out": str(tmp_path / "ray")}), **QUIET)
    for column in ("accuracy", "test_loss", "server_loss", "kept_energy", "total_bytes"):
        assert [r[column] for r in serial.rounds] == [r[column] for r in on_ray.rounds], column


# ---------------------------------------------------------------- the contract, checked

BROKEN = '''
from raysage.algorithms.base import (CLIENT_MODEL_DOWN, CLIENT_MODEL_UP, LABELS_UP, SMASHED_UP,
                                     Algorithm, ClientRoundPlan)
from raysage.algorithms.state import load_state, to_state
from raysage.algorithms.steps import smashed_exchange


class Broken(Algorithm):
    name = "broken"
    label = "Broken"
    description = "plans uploads at every iteration, sends {sends}"
    byte_kinds = (SMASHED_UP, LABELS_UP, CLIENT_MODEL_DOWN, CLIENT_MODEL_UP)
    aggregated = ("client",)

    def plan_client_round(self, rnd, p):
        return ClientRoundPlan(
            p.cid, download={{"{down}": 1}}, forward_flops=[1.0] * len(p.batch_sizes),
            backward_flops=[1.0] * len(p.batch_sizes),
            exchanges={{k: smashed_exchange(self, k, b) for k, b in enumerate(p.batch_sizes)}},
            upload={{"client_model_up": 1}})

    def build_client(self, client):
        client.models["client"] = self.arch.make_client()

    def client_round(self, client, rnd):
        x_c = client.models["client"]
        load_state(x_c, client.start["client"])
        for step in client.steps():
            h = x_c(step.x)
            if {sends}:
                yield step.upload(smashed=h, y=step.y)
        return {{"client": to_state(x_c)}}

    def serve(self, server, rnd, upload):
        return None
'''


@pytest.mark.parametrize("sends, down, words", [
    ("step.k == 0", "client_model_down", "has an upload at iteration 1 that client_round never"),
    ("True", "gossip", "kind 'gossip', which it does not declare"),
])
def test_a_client_round_that_breaks_its_plan_stops_with_one_line(tmp_path, sends, down, words):
    path = tmp_path / "broken.py"
    path.write_text(BROKEN.format(sends=sends, down=down))
    cfg = build_config(TINY, {"algorithm": f"{path}:Broken", "out": str(tmp_path / "run")})
    with pytest.raises(ContractError) as caught:
        simulate(cfg, **QUIET)
    assert words in str(caught.value) and "\n" not in str(caught.value)
    assert str(caught.value).startswith("broken")


@pytest.mark.parametrize("name, words", [
    ("nowhere.py:Algo", "no file"),
    ("{tmp}/notalgo.py:Thing", "not a subclass"),
    ("{tmp}/notalgo.py:Missing", "has no 'Missing'"),
    ("no_such_module_x:Algo", "cannot import module"),
    ("fsl-sage", "is not an algorithm"),
])
def test_an_unusable_algorithm_name_is_one_line(tmp_path, name, words):
    (tmp_path / "notalgo.py").write_text("class Thing:\n    pass\n")
    with pytest.raises(ConfigError) as caught:
        build_config({"algorithm": name.format(tmp=tmp_path)})
    assert words in str(caught.value) and "\n" not in str(caught.value)


def test_an_algorithm_from_an_importable_module(tmp_path, monkeypatch, fedprox):
    module_dir = Path(fedprox.rpartition(":")[0]).parent
    monkeypatch.syspath_prepend(str(module_dir))
    cfg = build_config(TINY, {"algorithm": "fedprox:FedProx", "mu": 0.1, "rounds": 1,
                              "out": str(tmp_path / "run")})
    assert cfg.section == "fedprox" and cfg.params.mu == 0.1
    result = simulate(cfg, **QUIET)
    assert result.summary["label"] == "FedProx" and "proximal" in result.rounds[0]
