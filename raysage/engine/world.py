"""The simulated world: everything about a run that exists before anything runs.

Data and its partition over clients, the clients' device profiles, the
algorithm, and the facts of the split model it needs for planning (bytes of
each part, FLOPs of each piece of training, the initial global state).

The driver builds the world without importing torch: counting a model's
bytes and FLOPs needs the model, so when torch is not loaded yet that is
done once in a short-lived child process (see :mod:`raysage.lazy`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import numpy as np

from ..algorithms import algorithm_class
from ..algorithms.base import (Algorithm, ClientState, ModelSizes, Participant, Setup, State,
                               defines_hook)
from ..config import LANGUAGE_DATASETS, Config, build_config
from ..data import ArrayDataset, batch_sizes, load_dataset, partition
from ..netsim.cost import ModelCosts
from ..errors import ContractError
from ..netsim.planner import ClientRoundPlan, RoundSchedule
from ..netsim.policy import available_clients, plan_with_policy, selection_size
from ..netsim.profiles import DeviceProfile, client_profiles
from ..streams import stream_seed, unseeded

SYNTHETIC_SAMPLES_PER_CLIENT = 100
SYNTHETIC_TEST_SAMPLES = 1000


@dataclass(frozen=True)
class ModelFacts:
    """What planning and the memory estimate need to know about the split model."""

    sizes: ModelSizes
    costs: ModelCosts
    initial_global: dict[str, State]
    client_state_bytes: int     # one client's kept state (see Keeps), optimizer moments included
    working_set_bytes: int      # one working set: models, their gradients, optimizer state


def count_model_facts(config: dict, num_classes: int) -> ModelFacts:
    """Build the models once and count (needs torch)."""
    from ..algorithms.state import state_nbytes
    from ..models import architecture, state_bytes, transfer_state
    from ..netsim.cost import measure_costs

    cfg = build_config(config)
    arch = architecture(cfg, num_classes)
    sizes, costs = ModelSizes.of(arch), measure_costs(arch, algorithm_class(cfg.algorithm))
    algo = Setup(cfg, num_classes, (0.0,) * 3, (1.0,) * 3, sizes, costs).algorithm()
    probe = ClientState(0, 0)
    # Under torch's generator lock: a sweep builds worlds on several threads at once, and
    # an unlocked draw here would move another point's seeded initial models.
    with unseeded():
        algo.build_client(probe)

    def moments(optimizer) -> int:
        return optimizer.moments * sum(p.numel() * p.element_size() for p in optimizer.params)

    keeps = algo.client_keeps
    kept = (sum(state_bytes(transfer_state(probe.models[m])) for m in keeps.models)
            + sum(moments(probe.optimizers[o]) for o in keeps.optimizers)
            + (state_nbytes(algo.fresh_client_tensors(0)) if keeps.tensors else 0))
    gradients = sum(p.numel() * p.element_size() for m in probe.models.values()
                    for p in m.parameters() if p.requires_grad)
    working = (state_nbytes(probe.models) + gradients
               + sum(moments(o) for o in probe.optimizers.values()))
    return ModelFacts(sizes, costs, algo.init_global(), kept, working)


def model_facts(cfg: Config, num_classes: int) -> ModelFacts:
    """Count here when torch is loaded anyway; otherwise in a child process.

    The child is a fresh interpreter (``python -m raysage.engine.world``), not
    a multiprocessing worker, so it never re-runs the caller's script. It
    answers with the facts as JSON and the initial global state as a
    safetensors blob.
    """
    if "torch" in sys.modules or cfg.backend == "serial":
        return count_model_facts(cfg.to_dict(), num_classes)
    import json
    import subprocess

    from ..errors import RaysageError
    from ..store import from_safetensors

    request = json.dumps({"config": cfg.to_dict(), "num_classes": num_classes}).encode()
    done = subprocess.run([sys.executable, "-m", "raysage.engine.world"], input=request,
                          capture_output=True)
    if done.returncode != 0:
        lines = done.stderr.decode(errors="replace").strip().splitlines() or ["(no output)"]
        if done.returncode == 2:       # a RaysageError: its one line is for the user
            raise RaysageError(lines[-1])
        raise RuntimeError("counting the model's bytes and FLOPs failed:\n" + "\n".join(lines[-20:]))
    header, _, blob = done.stdout.partition(b"\n")
    facts = json.loads(header)
    arrays = from_safetensors(blob, "the initial global state")
    initial = {part: {} for part in facts["parts"]}
    for name, array in arrays.items():
        part, _, key = name.partition("/")
        initial[part][key] = array
    return ModelFacts(ModelSizes(**facts["sizes"]), ModelCosts(**facts["costs"]), initial,
                      facts["client_state_bytes"], facts["working_set_bytes"])


def _answer_facts() -> None:
    """The child's side of :func:`model_facts`."""
    import dataclasses
    import json

    from ..errors import RaysageError
    from ..store import to_safetensors

    request = json.loads(sys.stdin.buffer.read())
    try:
        facts = count_model_facts(request["config"], request["num_classes"])
    except RaysageError as exc:
        print(exc, file=sys.stderr)
        sys.exit(2)
    header = {"sizes": dataclasses.asdict(facts.sizes), "costs": dataclasses.asdict(facts.costs),
              "parts": sorted(facts.initial_global),
              "client_state_bytes": facts.client_state_bytes,
              "working_set_bytes": facts.working_set_bytes}
    flat = {f"{part}/{key}": array for part, state in facts.initial_global.items()
            for key, array in state.items()}
    sys.stdout.buffer.write(json.dumps(header).encode() + b"\n" + to_safetensors(flat))


@dataclass
class World:
    cfg: Config
    data: ArrayDataset
    client_indices: list[np.ndarray]
    algorithm: Algorithm
    setup: Setup
    profiles: list[DeviceProfile]
    facts: ModelFacts
    # Samples each client has uploaded in the rounds planned so far (checkpointed).
    uploaded: dict[int, int] = field(default_factory=dict)

    def num_samples(self, cid: int) -> int:
        return len(self.client_indices[cid])

    def eval_clients(self, rnd: int) -> list[int]:
        """Clients whose own models are evaluated: all, or a seeded sample when many."""
        m, sample = self.cfg.clients, self.cfg.eval_clients
        if m <= sample:
            return list(range(m))
        rng = np.random.default_rng(stream_seed(self.cfg.seed, "eval-clients", rnd))
        return sorted(int(c) for c in rng.choice(m, size=sample, replace=False))

    def target_participants(self) -> int:
        return max(1, round(self.cfg.participation * self.cfg.clients))

    def selected_per_round(self) -> int:
        """Clients sampled per round, over-selection included."""
        cfg = self.cfg
        return selection_size(self.target_participants(), cfg.round_policy, cfg.over_selection,
                              cfg.clients)

    def participants(self, rnd: int) -> list[int]:
        """Selected clients: a seeded sample of the reachable ones (more under over-selection)."""
        cfg = self.cfg
        available = available_clients(
            self.profiles, np.random.default_rng(stream_seed(cfg.seed, "available", rnd)))
        count = self.selected_per_round()
        if count >= len(available):
            return available
        rng = np.random.default_rng(stream_seed(cfg.seed, "participants", rnd))
        return sorted(available[i] for i in rng.choice(len(available), size=count, replace=False))

    def plan(self, rnd: int, start: float) -> RoundSchedule:
        """Plan round rnd and count what its clients upload (see Participant.uploaded)."""
        cfg, algo = self.cfg, self.algorithm
        made: dict[int, ClientRoundPlan] = {}

        def make_plans(cids: list[int]) -> list[ClientRoundPlan]:
            plans = algo.plan_round(rnd, [
                Participant(c, batch_sizes(self.num_samples(c), cfg), self.uploaded.get(c, 0))
                for c in cids])
            check_plans(algo, plans, cids)
            made.update((plan.cid, plan) for plan in plans)
            return plans

        selected = self.participants(rnd)
        schedule = plan_with_policy(
            make_plans, selected, {c: self.profiles[c] for c in selected}, cfg.server_flops,
            start, policy=cfg.round_policy, deadline=cfg.deadline,
            keep=self.target_participants(), dropout=cfg.dropout,
            rng=np.random.default_rng(stream_seed(cfg.seed, "drops", rnd)))
        # A dropped client's work is lost, its uploads with it.
        for cid in schedule.clients:
            samples = sum(ex.samples for ex in made[cid].exchanges.values())
            if samples:
                self.uploaded[cid] = self.uploaded.get(cid, 0) + samples
        return schedule


def check_plans(algo: Algorithm, plans: list[ClientRoundPlan], cids: list[int]) -> None:
    """One plan per participant, using only the byte kinds the algorithm declares."""
    if sorted(plan.cid for plan in plans) != sorted(cids):
        raise ContractError(f"{algo.name}: plan_round returned plans for clients "
                            f"{sorted(plan.cid for plan in plans)[:5]}, not for its "
                            f"participants {sorted(cids)[:5]}")
    known = {kind.name for kind in algo.byte_kinds}
    for plan in plans:
        kinds = [*plan.download, *plan.upload]
        for exchange in plan.exchanges.values():
            kinds += [*exchange.up, *exchange.down]
            if not 0 <= exchange.k < plan.iterations:
                raise ContractError(f"{algo.name}: client {plan.cid} has an exchange at "
                                    f"iteration {exchange.k} of {plan.iterations}")
        unknown = sorted(set(kinds) - known)
        if unknown:
            raise ContractError(f"{algo.name}: its plan counts bytes of kind '{unknown[0]}', "
                                "which it does not declare; add a ByteKind to byte_kinds")
        if len(plan.backward_flops) != plan.iterations:
            raise ContractError(f"{algo.name}: client {plan.cid}'s plan has "
                                f"{plan.iterations} forward and {len(plan.backward_flops)} "
                                "backward FLOP counts; give one of each per iteration")


def load_language_data(cfg: Config) -> tuple[ArrayDataset, int | None]:
    from ..data.e2e import (SYNTHETIC_TEST, SYNTHETIC_TRAIN_PER_CLIENT, load_language_dataset,
                            make_tokenizer)

    synthetic = cfg.dataset == "e2e_synthetic"
    per_client = cfg.samples_per_client or (SYNTHETIC_TRAIN_PER_CLIENT if synthetic else None)
    tokenizer = make_tokenizer(cfg.tokenizer, cfg.tokenizer_dir or cfg.weights_dir)
    data = load_language_dataset(
        cfg.dataset, cfg.data_dir, tokenizer, cfg.seq_len,
        num_train=per_client * cfg.clients if per_client else None,
        num_test=cfg.test_samples or (SYNTHETIC_TEST if synthetic else None), seed=cfg.seed,
        max_slots=cfg.e2e_max_slots)
    return data, per_client


def load_data(cfg: Config) -> tuple[ArrayDataset, int | None]:
    """The dataset and the samples each client gets (None: the train split over clients)."""
    if cfg.dataset in LANGUAGE_DATASETS:
        return load_language_data(cfg)
    synthetic = cfg.dataset == "synthetic"
    per_client = cfg.samples_per_client or (SYNTHETIC_SAMPLES_PER_CLIENT if synthetic else None)
    data = load_dataset(
        cfg.dataset, cfg.data_dir,
        num_train=per_client * cfg.clients if synthetic else None,
        num_test=cfg.test_samples or (SYNTHETIC_TEST_SAMPLES if synthetic else None),
        seed=cfg.seed)
    return data, per_client


def build_world(cfg: Config) -> World:
    """Load data, partition it and build the algorithm; every input error surfaces here."""
    data, per_client = load_data(cfg)
    # Sequences have no class label; they are split iid, which only needs their count.
    labels = data.y_train if data.y_train.ndim == 1 else np.zeros(len(data.y_train), np.int64)
    indices = partition(labels, cfg.clients, cfg.partition, alpha=cfg.alpha,
                        shards_per_client=cfg.shards_per_client, samples_per_client=per_client,
                        seed=cfg.seed)
    facts = model_facts(cfg, data.num_classes)
    setup = Setup(cfg, data.num_classes, tuple(data.mean), tuple(data.std),
                  facts.sizes, facts.costs, algorithm_class(cfg.algorithm))
    profiles = client_profiles(cfg.profile, cfg.clients, cfg.seed, trace=cfg.profile_trace,
                               stragglers=cfg.stragglers, straggler_param=cfg.straggler_param,
                               availability=cfg.availability)
    algorithm = setup.algorithm()
    check_evaluated(algorithm, facts.initial_global)
    return World(cfg, data, indices, algorithm, setup, profiles, facts)


def check_evaluated(algo: Algorithm, initial_global: dict[str, State]) -> None:
    """Without a server process the default evaluation reads the whole model from the
    global state: it must be there (an own init_global may leave a half out)."""
    if (not algo.has_server and not defines_hook(type(algo), "eval_model")
            and not {"client", "server"} <= set(initial_global)):
        raise ContractError(
            f"{algo.name} has no server process, so it is evaluated as the whole model of "
            f"the global state, but init_global returns {sorted(initial_global)}; keep "
            "'client' and 'server' there or define eval_model()")


if __name__ == "__main__":
    _answer_facts()
