"""The student as the trainer sees it: Megatron model chunks, optimizer, LR schedule.

    student = Student.create(cfg, layout)          # collective
    metrics = student.train_on(batch, cfg.loss)    # one MOPD optimizer step (collective)
    student.save_state(dir); student.load_state(dir)

It composes `student.load` (build and fill the GPTModel), `student.train_step` (DDP,
optimizer, schedule), `student.mopd_step` (the MOPD loss inside the step) and
`student.state` (dist_checkpointing of model + optimizer + scheduler).
"""

from __future__ import annotations

from typing import Any

from megatron_mopd.config import Config, LossConfig
from megatron_mopd.errors import UserError


class Student:
    """A Megatron student ready to train (one per process)."""

    def __init__(
        self, cfg: Config, layout: Any, chunks, optimizer, scheduler, model_cfg, tokenizer
    ):
        self.cfg = cfg
        self.layout = layout
        self.model_chunks = chunks
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.model_cfg = model_cfg
        self.tokenizer = tokenizer
        self.step = 0

    @classmethod
    def create(cls, cfg: Config, layout: Any) -> Student:
        """Build the model (from `model.hf_path`, `model.mcore_path` or the config),
        wrap it in DDP and build its optimizer and LR schedule (collective)."""
        from megatron_mopd.student.load import build_student
        from megatron_mopd.student.train_step import build_optimizer, wrap_ddp

        chunks, model_cfg = build_student(cfg.model, cfg.parallel)
        chunks = wrap_ddp(chunks, cfg.parallel)
        optimizer, scheduler = build_optimizer(chunks, cfg.train, cfg.parallel)
        tokenizer = load_student_tokenizer(model_cfg)
        return cls(cfg, layout, chunks, optimizer, scheduler, model_cfg, tokenizer)

    @property
    def hf_dir(self) -> str | None:
        """The Hugging Face folder the student was loaded from (the rollout engine's start)."""
        return self.model_cfg.hf_path

    def train_on(self, batch, loss_cfg: LossConfig) -> dict:
        """One optimizer step with the MOPD loss over the global batch (collective)."""
        from megatron_mopd.student.mopd_step import mopd_train_step

        tok = self.tokenizer
        out = mopd_train_step(
            self.model_chunks,
            self.optimizer,
            batch,
            loss_cfg,
            self.cfg.train.micro_batch_size,
            scheduler=self.scheduler,
            max_tokens_per_microbatch=self.cfg.train.max_tokens_per_microbatch,
            pack_sequences=self.cfg.train.pack_sequences,
            pad_id=tok.pad_token_id if tok is not None and tok.pad_token_id is not None else 0,
        )
        self.step += 1
        return out

    def current_lr(self) -> float:
        """The learning rate of the next step."""
        return float(self.optimizer.param_groups[0]["lr"])

    def save_state(self, out_dir: str) -> None:
        """Model, optimizer and LR schedule to `out_dir` (collective)."""
        from megatron_mopd.student.state import save_training_state

        save_training_state(
            self.model_chunks,
            self.optimizer,
            self.scheduler,
            out_dir,
            model_cfg=self.model_cfg,
            optimizer_format=self.cfg.checkpoint.optimizer_format,
        )

    def load_state(self, in_dir: str) -> None:
        """Load what `save_state` wrote, at any layout (collective)."""
        from megatron_mopd.student.state import load_training_state

        load_training_state(self.model_chunks, self.optimizer, self.scheduler, in_dir)


def load_student_tokenizer(model_cfg) -> Any:
    """The student's tokenizer: `model.tokenizer_path`, else the HF folder's."""
    path = getattr(model_cfg, "tokenizer_path", None) or model_cfg.hf_path
    if path is None and model_cfg.mcore_path:
        path = model_cfg.mcore_path
    if path is None:
        raise UserError(
            "the student has no tokenizer: set model.hf_path (a Hugging Face folder with "
            "tokenizer files) or model.tokenizer_path"
        )
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UserError(f"student tokenizer {path}: cannot load: {e}".splitlines()[0]) from None
