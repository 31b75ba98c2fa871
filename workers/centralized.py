"""The server role of ``--method centralized``: one process trains the whole model on all
clients' data (the paper's upper bound), with no broker, clients or aggregator."""

from __future__ import annotations

import dataclasses

from lesft.config import Config
from lesft.engine import ClientParty
from lesft.export import final_outputs
from lesft.methods import get_method
from lesft.models import source_for
from lesft.runs import mark_run
from lesft.schedule import is_step_round, total_rounds
from lesft.trainer import client_shards, party_layout
from workers.common import Worker


class CentralizedServer(Worker):
    """Centralized SFT: the server alone trains the whole model on all clients' data."""

    role = "server"

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg, 0)
        self.method = get_method(cfg.train.method)
        self.source = source_for(cfg)
        shards, batch_size = party_layout(self.method, cfg, client_shards(cfg))
        centralized = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, client_device=cfg.train.device))
        self.party = ClientParty(centralized, self.source, self.method, 0, shards[0], self.source.load_tokenizer(),
                                 batch_size=batch_size, meter=self.meter)
        self.meter.device = str(self.party.device)

    def run(self) -> int:
        rounds = total_rounds(self.cfg, [self.party.n_samples], self.party.batch_size)
        self.log.info("%s on %s: %d examples, %d rounds", self.method.label, self.party.device,
                      self.party.n_samples, rounds)
        try:
            for r in range(rounds):
                if self.stop.is_set():
                    return 0
                tl = self.party.local_step(r)
                stepped = is_step_round(r, rounds, self.cfg.train.grad_accum) and self.party.step()
                self.record("round", round=r, rounds=rounds, loss=float(tl.loss.detach()), stepped=stepped,
                            wall_s=self.meter.wall_s(), **tl.stats)
            final_outputs(self.run_dir, self.cfg, self.source, self.method, None, {-1: self.party.adapters()})
            mark_run(self.run_dir, complete=True, rounds=rounds)
        finally:
            self.finish()
        return 0
