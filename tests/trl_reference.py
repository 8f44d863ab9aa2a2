"""TRL 1.16's GRPO loss on given tensors, the reference tunelab's GRPO losses are checked against
(tests/test_rl.py, tests/test_rl_losses.py): ``GRPOTrainer._compute_loss`` on a stand-in trainer whose
log-prob forward returns the tensors given."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

# loss_type here -> (TRL's loss_type, TRL's importance_sampling_level)
TRL_NAMES = {
    "grpo": ("grpo", "token"),
    "bnpo": ("bnpo", "token"),
    "dr_grpo": ("dr_grpo", "token"),
    "dapo": ("dapo", "token"),
    "gspo": ("grpo", "sequence"),
    "cispo": ("cispo", "token"),
}


def trl_grpo_loss(loss_type: str, beta: float, eps_low: float, eps_high: float, t: dict) -> torch.Tensor:
    """TRL's GRPOTrainer._compute_loss on given tensors (the log-prob forward replaced by ours)."""
    grpo_trainer = pytest.importorskip("trl.trainer.grpo_trainer")
    trl_type, level = TRL_NAMES[loss_type]
    logp = t["logp"]
    fake = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros_like(logp), None),
        aux_loss_enabled=False,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level=level,
        beta=beta,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        loss_type=trl_type,
        epsilon_low=eps_low,
        # TRL's cispo caps the weight at epsilon_high itself; tunelab's at 1 + clip_range_high
        epsilon_high=1.0 + eps_high if loss_type == "cispo" else eps_high,
        use_vllm=False,
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        max_completion_length=logp.size(1),
        _entropy_bonus_enabled=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        accelerator=SimpleNamespace(
            gather=lambda x: x,
            gather_for_metrics=lambda x: x,
            reduce=lambda x, reduction="sum": x,
            num_processes=1,
            sync_gradients=True,
        ),
    )
    inputs = {
        "prompt_ids": torch.ones(logp.size(0), 1, dtype=torch.long),
        "prompt_mask": torch.ones(logp.size(0), 1, dtype=torch.long),
        "completion_ids": torch.ones_like(t["mask"], dtype=torch.long),
        "completion_mask": t["mask"],
        "advantages": t["advantages"],
        "old_per_token_logps": t["old_logp"],
        "ref_per_token_logps": t["ref_logp"],
        "num_items_in_batch": t["mask"].sum(),
    }
    return grpo_trainer.GRPOTrainer._compute_loss(fake, None, inputs)
