"""Bytes measured against the plan, and a contract that checks itself early.

SCAFFOLD is written as a user would, in a file outside the package
(examples/scaffold.py); its bytes are checked by hand. Each mistake a user
made writing FedProx and SCAFFOLD from the README gets a test of its line.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from raysage.algorithms import ALGORITHMS, algorithm_class
from raysage.algorithms.base import Algorithm, check_contract
from raysage.config import build_config
from raysage.engine.orchestrator import simulate
from raysage.engine.traffic import ByteMismatch
from raysage.errors import ContractError
from raysage.models import architecture

QUIET = {"announce": lambda line: None}
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SCAFFOLD = f"{EXAMPLES / 'scaffold.py'}:Scaffold"
TINY = dict(clients=4, samples_per_client=20, batch_size=10, rounds=2, test_samples=40,
            backend="serial", seed=3, client_optimizer="sgd", client_lr=0.05)


def run(tmp_path, name: str, **fields):
    cfg = build_config(TINY | fields, {"out": str(tmp_path / name)})
    return simulate(cfg, **QUIET)


# ------------------------------------------------------------------ SCAFFOLD

def test_scaffold_moves_exactly_the_bytes_counted_by_hand(tmp_path):
    result = run(tmp_path, "scaffold", algorithm=SCAFFOLD)
    arch = architecture(build_config(TINY), 10)
    client, server = arch.make_client(), arch.make_server()
    # x: every state-dict tensor of both halves; c and Delta c_i: the parameters only.
    model = sum(t.numel() * 4 for m in (client, server) for t in m.state_dict().values())
    control = sum(p.numel() * 4 for m in (client, server) for p in m.parameters())
    for row in result.rounds:
        n = row["participants"]
        assert row["model_down"] == row["model_up"] == n * model
        assert row["control_down"] == row["control_up"] == n * control
        assert row["total_bytes"] == 2 * n * (model + control)
    for row in result.clients:
        assert (row["model_down"], row["control_down"]) == (model, control)


def test_scaffold_round_zero_is_fedavg_and_the_control_variates_then_move_it(tmp_path):
    # With c = c_i = 0 the correction vanishes: round 0 is FedAvg with SGD, bit for bit.
    scaffold = run(tmp_path, "scaffold", algorithm=SCAFFOLD, rounds=3)
    fedavg = run(tmp_path, "fedavg", algorithm="fedavg", rounds=3)
    first = [(r["accuracy"], r["test_loss"], r["train_loss"]) for r in (scaffold.rounds[0],
                                                                        fedavg.rounds[0])]
    assert first[0] == first[1]
    assert scaffold.rounds[2]["train_loss"] != fedavg.rounds[2]["train_loss"]
    # c = sum of the participants' Delta c_i over N, and it is not zero after round 0.
    assert np.abs(scaffold.global_state["control"]["c"]).sum() > 0
    assert "control" not in fedavg.global_state


def test_scaffold_keeps_each_clients_control_variate_across_a_resume(tmp_path):
    whole = run(tmp_path, "whole", algorithm=SCAFFOLD, rounds=3, participation=0.5,
                checkpoint_every=1)
    cut = build_config(TINY | {"algorithm": SCAFFOLD, "rounds": 3, "participation": 0.5,
                               "checkpoint_every": 1}, {"out": str(tmp_path / "cut")})
    simulate(cut.model_copy(update={"rounds": 2}), **QUIET)
    # The saved config says 2 rounds; a resumed run reads it back, so extend it there.
    config = tmp_path / "cut" / "config.yaml"
    config.write_text(config.read_text().replace("rounds: 2", "rounds: 3"))
    resumed = simulate(cut, resume=tmp_path / "cut", **QUIET)
    assert resumed.rounds[-1]["accuracy"] == whole.rounds[-1]["accuracy"]
    np.testing.assert_array_equal(resumed.global_state["control"]["c"],
                                  whole.global_state["control"]["c"])


# ------------------------------------------------------- bytes against the plan

UNPLANNED = '''
import sys
sys.path.insert(0, {folder!r})
from scaffold import Scaffold, CONTROL_DOWN, CONTROL_UP


class Forgetful(Scaffold):
    """SCAFFOLD whose plan leaves the control variates out (what a user did)."""
    name = "forgetful"

    def plan_client_round(self, rnd, p):
        plan = super().plan_client_round(rnd, p)
        plan.download.pop(CONTROL_DOWN.name)
        if {drop_up}:
            plan.upload.pop(CONTROL_UP.name)
        return plan


class Unnamed(Scaffold):
    """SCAFFOLD without a byte kind for its control update."""
    name = "unnamed"
    byte_kinds = tuple(k for k in Scaffold.byte_kinds if k is not CONTROL_UP)

    def plan_client_round(self, rnd, p):
        plan = super().plan_client_round(rnd, p)
        plan.upload.pop(CONTROL_UP.name)
        return plan
'''


def user_file(tmp_path, source: str, **values) -> Path:
    path = tmp_path / "algos" / "user.py"
    path.parent.mkdir(exist_ok=True)
    path.write_text(source.format(**values))
    return path


@pytest.mark.parametrize("drop_up", [False, True])
def test_control_variates_left_out_of_the_plan_stop_the_run_in_one_line(tmp_path, drop_up):
    path = user_file(tmp_path, UNPLANNED, folder=str(EXAMPLES), drop_up=drop_up)
    with pytest.raises(ByteMismatch) as error:
        run(tmp_path, "forgetful", algorithm=f"{path}:Forgetful")
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("forgetful: client ")
    # The first thing the client does is read the broadcast's control part.
    control = sum(p.numel() * 4 for p in architecture(build_config(TINY), 10).make_full()
                  .parameters())
    assert f"moved {control} bytes of control_down" in message
    assert "declared 0" in message
    assert not (tmp_path / "forgetful" / "rounds.parquet").exists()


def test_an_array_no_byte_kind_carries_stops_the_run_naming_it(tmp_path):
    path = user_file(tmp_path, UNPLANNED, folder=str(EXAMPLES), drop_up=True)
    with pytest.raises(ByteMismatch, match="carries 'control_delta' .* which no byte kind"):
        run(tmp_path, "unnamed", algorithm=f"{path}:Unnamed")


TOPK = f"{EXAMPLES / 'topk_splitfed.py'}:TopKSplitFed"


@pytest.mark.parametrize("algorithm", [*ALGORITHMS, SCAFFOLD, TOPK])
def test_every_algorithm_moves_exactly_what_it_plans(tmp_path, algorithm, monkeypatch):
    """Measurement is on in every run: every message of every client and round is held
    against its plan, and every kind the results count was measured moving."""
    from raysage.engine.traffic import Traffic

    compared = []
    original = Traffic._compare

    def record(self, measured, planned, what):
        compared.append((self.cid, self.rnd, what, dict(measured), dict(planned)))
        original(self, measured, planned, what)

    monkeypatch.setattr(Traffic, "_compare", record)
    fields = dict(rounds=3, participation=0.75, local_epochs=2, align_interval=2,
                  align_epochs=1, server_update_interval=2, dropout=0.25)
    result = run(tmp_path, "run", algorithm=algorithm, **fields)
    assert all(measured == planned for *_, measured, planned in compared)
    # Each client that finished a round had its broadcast and end-of-round upload checked.
    finished = {(r["client"], r["round"]) for r in result.clients if not r["dropped"]}
    for what in ("the broadcast", "the end-of-round upload"):
        assert {(cid, rnd) for cid, rnd, w, *_ in compared if w == what} == finished
    # Every kind with bytes in the results was measured, with the same total.
    algo = algorithm_class(algorithm)
    measured_total = {}
    for *_, measured, _ in compared:
        for kind, n in measured.items():
            measured_total[kind] = measured_total.get(kind, 0) + n
    kept = [r for r in result.clients if not r["dropped"]]
    for kind in (k.name for k in algo.byte_kinds):
        assert measured_total.get(kind, 0) == sum(r[kind] for r in kept), kind
    assert sum(measured_total.values()) > 0


# ------------------------------------------------------- the contract, early

KEEPS_NO_FRESH = '''
from raysage.algorithms.base import Algorithm, Keeps


class Controlled(Algorithm):
    name, label, description = "controlled", "Controlled", "keeps a model with no first state"
    client_keeps = Keeps(models=("c_i",))

    def plan_client_round(self, rnd, p): ...
    def build_client(self, client): ...
    def client_round(self, client, rnd): ...
'''

SERVERLESS_HALF = '''
from raysage.algorithms.base import Algorithm


class Half(Algorithm):
    name, label, description = "half", "Half", "averages x_c only and has no server"
    aggregated = ("client",)
    has_server = False

    def plan_client_round(self, rnd, p): ...
    def build_client(self, client): ...
    def client_round(self, client, rnd): ...
'''

NO_ROUND = '''
from raysage.algorithms.base import Algorithm


class Planless(Algorithm):
    name, label, description = "planless", "Planless", "forgot its client round"

    def plan_client_round(self, rnd, p): ...
    def build_client(self, client): ...
'''


@pytest.mark.parametrize("source, cls, words", [
    (KEEPS_NO_FRESH, "Controlled", "must define fresh_client_models() because client_keeps "
                                   "keeps models ['c_i']"),
    (SERVERLESS_HALF, "Half", "has no server process, so by default it is evaluated as the "
                              "whole model"),
    (NO_ROUND, "Planless", "must define client_round()"),
])
def test_a_missing_hook_is_one_line_when_the_algorithm_is_loaded(tmp_path, source, cls, words):
    path = tmp_path / f"{cls.lower()}.py"
    path.write_text(source)
    with pytest.raises(ContractError) as error:
        algorithm_class(f"{path}:{cls}")
    assert words in str(error.value)
    assert "\n" not in str(error.value)


def test_a_serverless_algorithm_whose_global_state_lacks_a_half_is_refused_before_it_runs(
        tmp_path):
    path = tmp_path / "own_init.py"
    path.write_text(FEDPROX_NO_EVAL + """

class OwnInit(Plain):
    name = "own_init"

    def init_global(self):
        return {"client": super().init_global()["client"]}
""")
    with pytest.raises(ContractError, match="init_global returns \\['client'\\]; keep"):
        run(tmp_path, "own_init", algorithm=f"{path}:OwnInit")
    assert not (tmp_path / "own_init").exists()


def test_every_built_in_algorithm_keeps_the_contract():
    for cls in ALGORITHMS.values():
        check_contract(cls)


FEDPROX_NO_EVAL = '''
from raysage.algorithms.base import TRAIN_LOSS, Algorithm, ClientRoundPlan, Keeps
from raysage.algorithms.fedavg import MODEL_DOWN, MODEL_UP
from raysage.algorithms.state import load_state, to_state
from raysage.lazy import nn
from raysage.models import split_loss


class Plain(Algorithm):
    """A whole-model algorithm with no eval_model: FedAvg written by a user."""
    name, label, description = "plain", "Plain", "FedAvg by hand"
    byte_kinds = (MODEL_DOWN, MODEL_UP)
    aggregated = ("client", "server")
    client_keeps = Keeps(optimizers=("full",))
    has_server = False

    def plan_client_round(self, rnd, p):
        whole = self.sizes.client + self.sizes.server
        return ClientRoundPlan(p.cid, download={MODEL_DOWN.name: whole},
                               forward_flops=[self.costs.full_step * b for b in p.batch_sizes],
                               backward_flops=[0.0] * len(p.batch_sizes), exchanges={},
                               upload={MODEL_UP.name: whole})

    def build_client(self, client):
        model = self.place(nn.Sequential(self.arch.make_client(), self.arch.make_server()))
        client.models["full"] = model
        client.optimizers["full"] = self.client_optimizer(model)

    def client_round(self, client, rnd):
        model, optimizer = client.models["full"], client.optimizers["full"]
        load_state(model[0], client.start["client"])
        load_state(model[1], client.start["server"])
        for step in client.steps():
            loss = split_loss(model(step.x), step.y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return {"client": to_state(model[0]), "server": to_state(model[1])}
'''


def test_a_whole_model_algorithm_is_scored_on_its_whole_trained_model(tmp_path):
    path = tmp_path / "plain.py"
    path.write_text(FEDPROX_NO_EVAL)
    plain = run(tmp_path, "plain", algorithm=f"{path}:Plain")
    fedavg = run(tmp_path, "fedavg", algorithm="fedavg")
    for mine, theirs in zip(plain.rounds, fedavg.rounds, strict=True):
        assert (mine["accuracy"], mine["test_loss"]) == (theirs["accuracy"],
                                                         theirs["test_loss"])
    assert not math.isnan(plain.rounds[-1]["accuracy"])


def test_a_tensor_of_the_wrong_kind_is_one_line():
    from raysage.engine.traffic import nbytes

    assert nbytes({"a": np.zeros(3, np.float32), "b": torch.zeros(2, dtype=torch.float64)}) == 28
    with pytest.raises(ContractError, match="a str travels"):
        nbytes({"a": "text"})


ANSWERS = '''
from raysage.algorithms.cse_fsl import CSEFSL


class Chatty(CSEFSL):
    """CSE-FSL whose server answers uploads the plan gives no reply."""
    name = "chatty"

    def serve(self, server, rnd, upload):
        super().serve(server, rnd, upload)
        return upload["smashed"]


class Failing(CSEFSL):
    """CSE-FSL whose server fails on an upload nobody waits for."""
    name = "failing"

    def serve(self, server, rnd, upload):
        if rnd == 1:
            raise ValueError("the server broke in round 1")
        return super().serve(server, rnd, upload)
'''


def test_a_reply_the_plan_does_not_deliver_stops_the_run(tmp_path):
    path = tmp_path / "answers.py"
    path.write_text(ANSWERS)
    with pytest.raises(ContractError) as error:
        run(tmp_path, "chatty", algorithm=f"{path}:Chatty")
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("chatty: serve answered client 0's upload at iteration 0, but "
                              "plan_client_round plans no reply there")


def test_an_error_while_serving_an_upload_nobody_waits_for_is_not_lost_on_ray(tmp_path,
                                                                              ray_session):
    path = tmp_path / "answers.py"
    path.write_text(ANSWERS)
    with pytest.raises(Exception, match="the server broke in round 1"):
        run(tmp_path, "failing", algorithm=f"{path}:Failing", backend="ray", workers=1,
            cpus_per_worker=1)
