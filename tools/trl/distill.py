"""TRL's side of `tools/bench_vs_trl.py`: TRL 1.16's `DistillationTrainer` on the demo's toy.

    .venv-trl/bin/python tools/trl/distill.py --toy runs/demo/toy --steps 150 --out trl.jsonl

Runs in TRL's own environment (`make trl`; it never imports megatron_mopd, so nothing of
TRL's enters ours). The same student, teachers and prompts as `examples/toy/mopd.yaml`:
128 on-policy sequences per step (TRL samples one completion per prompt, so 128 prompts),
at most 8 new tokens at temperature 1, reverse KL (`beta=1`), the same learning-rate
schedule, one CPU thread.

TRL distils from one teacher model; the toy has one teacher per domain. `DomainTeachers`
gives TRL one model that is both: its backbone runs each sequence through the teacher of
its domain (read from the prompt's first token: the reverse task's prompts start with
"rev:") and returns the hidden states side by side, zero where a teacher did not run, and
its output layer is the teachers' output layers side by side, so the logits TRL computes
are exactly each sequence's own teacher's. Each sequence is scored by its teacher only, as
our trainer does.

Writes JSON lines to `--out`: one `{"step", "seconds", "tokens"}` per optimizer step (wall
time from the end of the previous step, evaluation excluded; completion tokens of the
step) and one `{"eval_step", "eval_acc/<domain>"}` per evaluation (greedy, exact match,
on the first `--eval-prompts` prompts of the toy's eval set, as our trainer evaluates).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def read_jsonl(path: str) -> list[dict]:
    """The records of a JSONL file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class _Backbone(torch.nn.Module):
    """Each row through its domain's teacher; hidden states side by side (zeros elsewhere)."""

    def __init__(self, owner: DomainTeachers) -> None:
        super().__init__()
        self._owner = [owner]  # not a submodule: the teachers are registered on the owner

    def forward(self, input_ids, attention_mask, **_: object):
        from transformers.modeling_outputs import BaseModelOutput

        owner = self._owner[0]
        domain = owner.domain_of(input_ids, attention_mask)
        parts = []
        for d, teacher in owner.teachers.items():
            rows = (domain == owner.domain_index[d]).nonzero().flatten()
            hidden = torch.zeros(*input_ids.shape, teacher.config.hidden_size)
            if len(rows):
                out = teacher.model(
                    input_ids=input_ids[rows], attention_mask=attention_mask[rows], use_cache=False
                )
                hidden[rows] = out.last_hidden_state.to(hidden.dtype)
            parts.append(hidden)
        return BaseModelOutput(last_hidden_state=torch.cat(parts, dim=-1))


class DomainTeachers(torch.nn.Module):
    """One teacher model for TRL made of one teacher per domain (see the module docstring)."""

    def __init__(self, teachers: dict[str, torch.nn.Module], first_token: dict[int, str]) -> None:
        super().__init__()
        self.teachers = torch.nn.ModuleDict(teachers)
        self.domain_index = {d: i for i, d in enumerate(teachers)}
        self.first_token = first_token
        self.default = next(d for d in teachers if d not in first_token.values())
        self.config = next(iter(teachers.values())).config
        weights = [t.get_output_embeddings().weight for t in teachers.values()]
        self.lm_head = torch.nn.Linear(sum(w.shape[1] for w in weights), weights[0].shape[0], False)
        self.lm_head.weight.data.copy_(torch.cat(weights, dim=1))
        self.backbone = _Backbone(self)
        self.requires_grad_(False)

    @property
    def base_model(self) -> torch.nn.Module:
        """The backbone TRL calls for the hidden states."""
        return self.backbone

    def get_output_embeddings(self) -> torch.nn.Module:
        """The teachers' output layers side by side."""
        return self.lm_head

    def domain_of(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The domain index of each row, from its first real (unpadded) token."""
        first = input_ids.gather(1, attention_mask.argmax(dim=1, keepdim=True)).flatten()
        out = torch.full_like(first, self.domain_index[self.default])
        for tok, d in self.first_token.items():
            out[first == tok] = self.domain_index[d]
        return out


def evaluate(model, tok, records: list[dict], max_new_tokens: int) -> dict[str, float]:
    """Greedy exact-match accuracy per domain (answer = the decoded text before EOS)."""
    was_training = model.training
    model.eval()
    enc = [tok(r["prompt"], add_special_tokens=False)["input_ids"] for r in records]
    width = max(len(e) for e in enc)
    ids = torch.full((len(enc), width), tok.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(enc):
        ids[i, width - len(e) :] = torch.tensor(e)
        mask[i, width - len(e) :] = 1
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    hits: dict[str, list[float]] = {}
    for r, row in zip(records, out[:, width:].tolist()):
        if tok.eos_token_id in row:
            row = row[: row.index(tok.eos_token_id)]
        text = tok.decode(row, skip_special_tokens=True)
        hits.setdefault(r["domain"], []).append(float(text.strip() == str(r["answer"]).strip()))
    model.train(was_training)
    return {f"eval_acc/{d}": sum(v) / len(v) for d, v in sorted(hits.items())}


def trl_config(args: argparse.Namespace):
    """TRL's settings matching examples/toy/mopd.yaml (reverse KL, temperature 1, the same
    schedule), on CPU, logging and saving nothing of its own."""
    from trl import DistillationConfig

    return DistillationConfig(
        output_dir=os.path.join(os.path.dirname(os.path.abspath(args.out)), "trl_out"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1,
        learning_rate=args.lr,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr": args.min_lr},
        warmup_steps=args.warmup,
        max_grad_norm=1.0,
        beta=1.0,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        max_completion_length=args.max_new_tokens,
        logging_steps=10**9,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        seed=args.seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )


def main(argv: list[str] | None = None) -> None:
    """Train with TRL and write the per-step figures."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--toy", required=True, help="the toy's folder (runs/demo/toy)")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=128, help="sequences per step")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--lr", type=float, default=3.0e-4)
    p.add_argument("--min-lr", type=float, default=3.0e-5)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--eval-interval", type=int, default=25)
    p.add_argument("--eval-prompts", type=int, default=400)
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DistillationTrainer

    tok = AutoTokenizer.from_pretrained(os.path.join(args.toy, "student"))
    tok.padding_side = "left"
    teachers = {
        d: AutoModelForCausalLM.from_pretrained(os.path.join(args.toy, "teachers", d))
        for d in ("add", "reverse")
    }
    teacher = DomainTeachers(teachers, {tok.convert_tokens_to_ids("r"): "reverse"})
    train = read_jsonl(os.path.join(args.toy, "data", "train.jsonl"))
    evals = read_jsonl(os.path.join(args.toy, "data", "eval.jsonl"))[: args.eval_prompts]
    dataset = Dataset.from_list([{"prompt": r["prompt"]} for r in train])
    out = open(args.out, "w")

    class Figures(TrainerCallback):
        """Per-step wall time and tokens, evaluation every `--eval-interval` steps."""

        def __init__(self) -> None:
            self.last = time.perf_counter()

        def on_step_end(self, targs, state, control, model=None, **kw):
            now = time.perf_counter()
            tokens = trainer.step_tokens
            row = {"step": state.global_step, "seconds": now - self.last, "tokens": tokens}
            out.write(json.dumps(row) + "\n")
            step = state.global_step
            if args.eval_interval and (step % args.eval_interval == 0 or step == args.steps):
                acc = evaluate(model, tok, evals, args.max_new_tokens)
                out.write(json.dumps({"eval_step": step, **acc}) + "\n")
            out.flush()
            self.last = time.perf_counter()

    class Trainer(DistillationTrainer):
        """Counts the completion tokens of each step (for tokens/s)."""

        step_tokens = 0

        def _generate_and_score_completions(self, inputs):
            batch = super()._generate_and_score_completions(inputs)
            self.step_tokens = int(batch["completion_mask"].sum())
            return batch

    config = trl_config(args)
    student = AutoModelForCausalLM.from_pretrained(os.path.join(args.toy, "student"))
    trainer = Trainer(
        model=student,
        teacher_model=teacher,
        args=config,
        train_dataset=dataset,
        processing_class=tok,
        callbacks=[Figures()],
    )
    out.write(json.dumps({"eval_step": 0, **evaluate(student, tok, evals, args.max_new_tokens)}))
    out.write("\n")
    trainer.train()
    out.close()


if __name__ == "__main__":
    main()
