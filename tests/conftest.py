"""Shared fixtures: tiny models and tokenizers built in code and saved to disk, so every test
goes through the real ``from_pretrained`` loading path (there is no model hub here)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TRUSTRL_NO_PROGRESS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# report.html + plots cost seconds per run: written only where a test asks (monkeypatch.delenv)
os.environ.setdefault("TRUSTRL_NO_REPORT", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A 1-layer Llama with a character tokenizer (special tokens <answer>, </answer>)."""
    from trustrl.tasks.arithmetic import CHARS, SPECIAL_TOKENS
    from trustrl.tiny import create_tiny_model_dir

    path = tmp_path_factory.mktemp("tiny_model")
    return create_tiny_model_dir(path, chars=CHARS + "abc\n", special_tokens=SPECIAL_TOKENS, seed=0,
                                 hidden_size=32, num_layers=1, num_heads=2, max_position_embeddings=64)


@pytest.fixture(scope="session")
def addition_data(tmp_path_factory):
    from trustrl.tasks.arithmetic import AdditionTask, write_task_data

    path = tmp_path_factory.mktemp("addition_data")
    return write_task_data(path, AdditionTask(digits=1, holdout_every=5), seed=0, n_pretrain_docs=50, n_sft=64, n_eval=8)


@pytest.fixture
def first_step_gradients(monkeypatch):
    """``first_step_gradients(trainer)``: train, and return the accumulated gradients of the
    first optimizer step, captured where the trainer hands them to the data-parallel
    reduction (``trustrl.distributed.all_reduce_gradients``)."""
    import trustrl.distributed as dist

    def run(trainer):
        captured: dict = {}

        def capture(module, *args, **kwargs):
            if not captured:
                for name, p in module.named_parameters():
                    if p.grad is not None:
                        captured[name] = p.grad.detach().clone()

        monkeypatch.setattr(dist, "all_reduce_gradients", capture)
        trainer.train()
        monkeypatch.undo()
        assert captured
        return captured

    return run


@pytest.fixture
def grpo_update_gradients(monkeypatch):
    """``grpo_update_gradients()``: from now on, record the gradients GRPO hands to each optimizer
    step (``trustrl.algorithms.grpo.guarded_step``); returns the list they are appended to."""
    import trustrl.algorithms.grpo as grpo_module

    def start() -> list[dict]:
        captured: list[dict] = []
        original = grpo_module.guarded_step

        def capturing(model, *args, **kwargs):
            captured.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})
            return original(model, *args, **kwargs)

        monkeypatch.setattr(grpo_module, "guarded_step", capturing)
        return captured

    return start


def pytest_configure(config):
    # tiny models: one intra-op thread avoids oversubscribing the 2 cores of CI machines
    import torch

    torch.set_num_threads(1)
