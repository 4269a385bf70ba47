"""The probe-based metrics of `eval.suite` (absorption, sparse_probing) for an SAE and its random baselines,
as report sections keyed like SAEBench's result files, with each baseline's figures and the gap (SAE minus
baseline) beside the SAE's.

A `ProbeSession` holds what depends only on the model and hook (the probe datasets' activations, the letter
probes, the model's own probe accuracies), computed on first use and shared by every SAE evaluated with it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from saelab.eval import absorption, sparse_probing
from saelab.eval.baselines import SAME_CODES
from saelab.eval.config import EvalConfig
from saelab.eval.first_letter import LETTERS, FirstLetterData, first_letter_data
from saelab.eval.logistic import LinearProbe
from saelab.eval.probe_data import ProbeModel
from saelab.eval.sparse_probing import BinarySplit, ProbeDataset
from saelab.sae.base import SAE

SAMPLE_ROWS = 4096


@dataclass
class ProbeSession:
    """The model-side data of the probe metrics at one hook (built lazily, reused across SAEs)."""

    model: ProbeModel
    cfg: EvalConfig
    _first_letter: FirstLetterData | None = None
    _letter_probe: tuple[LinearProbe, list[float]] | None = None
    _probing: (
        tuple[list[ProbeDataset], list[dict[str, str]], list[list[BinarySplit]], list[tuple[dict, dict]]]
        | None
    ) = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def cache_root(self) -> str | None:
        return self.cfg.probe_cache or None

    def first_letter(self) -> FirstLetterData:
        if self._first_letter is None:
            self._first_letter = first_letter_data(
                self.model, self.cfg.absorption, self.cfg.seed, self.cache_root
            )
        return self._first_letter

    def letter_probes(self) -> tuple[LinearProbe, list[float]]:
        if self._letter_probe is None:
            data = self.first_letter()
            probe = absorption.train_letter_probes(data, self.cfg.absorption.probe_l2)
            self._letter_probe = probe, absorption.letter_probe_f1(probe, data)
        return self._letter_probe

    def probing(
        self,
    ) -> tuple[list[ProbeDataset], list[dict[str, str]], list[list[BinarySplit]], list[tuple[dict, dict]]]:
        """(datasets, skipped tasks, each dataset's binary splits, the model's accuracies on each)."""
        if self._probing is None:
            cfg = self.cfg.sparse_probing
            datasets, skipped = sparse_probing.load_datasets(
                self.model, cfg, self.cfg.seed, self.cache_root, self.first_letter
            )
            splits = [sparse_probing.binary_splits(d, self.cfg.seed) for d in datasets]
            llm = [sparse_probing.model_results(d, s, cfg) for d, s in zip(datasets, splits, strict=True)]
            self._probing = datasets, skipped, splits, llm
        return self._probing

    def sample(self) -> Tensor:
        """Up to SAMPLE_ROWS activation rows at the hook from the probe data (text tasks first), for the baselines."""
        if "sparse_probing" in self.cfg.suite:
            rows = [d.train.rows for d in self.probing()[0] if d.name != "first_letter"]
            if rows:
                return torch.cat(rows)[:SAMPLE_ROWS]
        return self.first_letter().acts[:SAMPLE_ROWS]


def gaps(sae: dict[str, Any], baseline: dict[str, Any]) -> dict[str, float]:
    """SAE minus baseline for every numeric key both have."""
    return {
        k: float(v) - float(baseline[k])
        for k, v in sae.items()
        if isinstance(v, (int, float)) and isinstance(baseline.get(k), (int, float))
    }


def absorption_section(session: ProbeSession, sae: SAE, baselines: dict[str, SAE]) -> dict[str, Any]:
    """SAEBench's `absorption_first_letter` result for the SAE, each baseline's, and the gaps."""
    cfg = session.cfg.absorption
    data = session.first_letter()
    probe, f1 = session.letter_probes()
    section: dict[str, Any] = {
        "eval_type_id": absorption.EVAL_TYPE_ID,
        "eval_config": {**dataclasses.asdict(cfg), "random_seed": session.cfg.seed},
        "words": {"train": int(data.train.sum()), "test": int((~data.train).sum())},
        "probe_test_f1": dict(zip(LETTERS, f1, strict=True)),
        **absorption.absorption_metrics(sae, data, probe, f1, cfg),
        "baselines": {},
        "gap": {},
    }
    for name, baseline in baselines.items():
        result = absorption.absorption_metrics(baseline, data, probe, f1, cfg)
        section["baselines"][name] = result
        if "eval_result_metrics" in result and "eval_result_metrics" in section:
            section["gap"][name] = gaps(
                section["eval_result_metrics"]["mean"], result["eval_result_metrics"]["mean"]
            )
    return section


def sparse_probing_section(session: ProbeSession, sae: SAE, baselines: dict[str, SAE]) -> dict[str, Any]:
    """SAEBench's `sparse_probing` result for the SAE (and the model's own probes), each baseline's, the gaps."""
    cfg = session.cfg.sparse_probing
    datasets, skipped, splits, llm = session.probing()
    if not datasets:
        return {"eval_type_id": sparse_probing.EVAL_TYPE_ID, "skipped": skipped}

    def run(model: SAE) -> tuple[dict[str, float], list[dict[str, Any]], dict[str, Any]]:
        details, unstructured = [], {}
        for data, split, (llm_means, llm_classes) in zip(datasets, splits, llm, strict=True):
            means, per_class = sparse_probing.sae_results(model, data, split, cfg)
            details.append({"dataset_name": data.name, **llm_means, **means})
            unstructured[f"{data.name}_results"] = {**llm_classes, **per_class}
        keys = list(details[0])[1:]
        return sparse_probing.summarise(details, keys), details, unstructured

    means, details, unstructured = run(sae)
    section: dict[str, Any] = {
        "eval_type_id": sparse_probing.EVAL_TYPE_ID,
        "eval_config": {**dataclasses.asdict(cfg), "random_seed": session.cfg.seed},
        "eval_result_metrics": {
            "llm": {k: v for k, v in means.items() if k.startswith("llm_")},
            "sae": {k: v for k, v in means.items() if k.startswith("sae_")},
        },
        "eval_result_details": details,
        "eval_result_unstructured": unstructured,
        "skipped": skipped,
        "baselines": {},
        "gap": {},
    }
    for name, baseline in baselines.items():
        if name in SAME_CODES:  # its codes are the SAE's: the same figures by construction
            section["baselines"][name] = {
                "same_codes_as_sae": True,
                "eval_result_metrics": {"sae": dict(section["eval_result_metrics"]["sae"])},
            }
        else:
            b_means, b_details, _ = run(baseline)
            section["baselines"][name] = {
                "eval_result_metrics": {"sae": {k: v for k, v in b_means.items() if k.startswith("sae_")}},
                "eval_result_details": [
                    {k: v for k, v in d.items() if not k.startswith("llm_")} for d in b_details
                ],
            }
        section["gap"][name] = gaps(
            section["eval_result_metrics"]["sae"], section["baselines"][name]["eval_result_metrics"]["sae"]
        )
    return section
