"""MoE routing replay (R3): the student routes every token to the rollout engine's experts.

    replay = RoutingReplay(model_chunks, replay=True)
    with replay:                                   # per train step
        train_step(..., before_forward=replay.set_micro_batch)
    replay.mismatch()  # (token-layer pairs routed differently, pairs compared), all ranks

The rollout engine returns, per sequence, the experts each MoE layer chose for every token
it fed to the model (`Rollout.routed_experts`: prompt + response[:-1]); the batch carries
them as `routed_experts_B_T_X`, int32 `[B, T, num_layers * top_k]`, -1 where unknown
(the last token of a sequence, padding). Before each micro-batch's forward,
`set_micro_batch` hands every MoE router of this rank megatron-core's own replay target
(`RouterReplay.set_target_indices`, `TransformerConfig.moe_enable_routing_replay`), laid
out as the router sees its tokens: `[S_local * B, top_k]`, sequence-major, with sequence
parallelism this TP rank's slice of the sequence, and only the layers of this pipeline
stage (a router's global `layer_number` picks its columns). Positions without a recorded
choice get experts 0..k-1: they are the last token and padding, whose outputs reach no
log-prob the loss reads (causal attention, right padding).

Forward and recompute: megatron-core replays `target_topk_idx` in `REPLAY_FORWARD` and pops
its FIFO `replay_backward_list` (filled by every `set_target_indices`) in
`REPLAY_BACKWARD`. A forward pre-hook on each router picks the action: REPLAY_BACKWARD
when the router runs inside autograd's backward (activation recomputation), else
REPLAY_FORWARD. Backward passes run in the micro-batches' forward order under megatron's
schedules, which is what the FIFO needs. tests/test_routing_replay.py checks full
recomputation at one process and at PP2 (1F1B runs forwards ahead of backwards, so
replaying the latest target there would be wrong: that variant fails the test).

Measurement: a forward hook on each router compares the routing map it returned with the
engine's choice at the recorded positions: `mismatch()` sums, over every rank (all
micro-batches, all layers), the token-layer pairs whose expert sets differ and the pairs
compared. With replay on it must be 0; with replay off it is the fraction of routing flips
between the engine (e.g. bf16) and the trainer (logged as `routing_mismatch_frac`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from megatron_mopd.errors import ConfigError


def _in_backward() -> bool:
    """Whether autograd's engine is running a backward on this thread (recomputation)."""
    return torch._C._current_graph_task_id() != -1


def moe_routers(model_chunks: list[Any]) -> list[Any]:
    """This rank's megatron MoE routers (`TopKRouter`), in layer order."""
    from megatron.core.transformer.moe.router import TopKRouter

    from megatron_mopd.student.logprobs import unwrap_model

    routers = [
        m
        for chunk in model_chunks
        for m in unwrap_model(chunk).modules()
        if isinstance(m, TopKRouter)
    ]
    return sorted(routers, key=lambda r: r.layer_number)


class RoutingReplay:
    """Per-step replay set-up and routing comparison (see the module docstring)."""

    def __init__(self, model_chunks: list[Any], replay: bool) -> None:
        from megatron_mopd.student.logprobs import unwrap_model

        self.replay = replay
        self.config = unwrap_model(model_chunks[0]).config
        self.pgs = unwrap_model(model_chunks[0]).pg_collection
        self.routers = moe_routers(model_chunks)
        self.top_k = int(self.config.moe_router_topk or 0)
        if replay and any(r.router_replay is None for r in self.routers):
            raise ConfigError(
                "loss.routing_replay=true: the student's routers have no RouterReplay (build "
                "the model with megatron_mopd.student.model.build_model)"
            )
        self._targets: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._counts = torch.zeros(2, dtype=torch.float64)
        self._handles: list = []

    # ------------------------------------------------------------------ hooks

    def __enter__(self) -> RoutingReplay:
        from megatron.core.transformer.moe.router_replay import RouterReplayAction

        self._counts.zero_()
        for router in self.routers:
            if self.replay:

                def pre(mod, _args, _kwargs=None):
                    mod.router_replay.set_router_replay_action(
                        RouterReplayAction.REPLAY_BACKWARD
                        if _in_backward()
                        else RouterReplayAction.REPLAY_FORWARD
                    )

                self._handles.append(router.register_forward_pre_hook(pre))
            self._handles.append(router.register_forward_hook(self._compare))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for router in self.routers:
            if router.router_replay is not None:
                router.router_replay.clear_indices()
                router.router_replay.clear_router_replay_action()
        self._targets.clear()

    def _compare(self, router: Any, _inputs: Any, output: Any) -> None:
        if _in_backward() or id(router) not in self._targets:
            return
        target, known = self._targets[id(router)]
        routing_map = output[1].detach().bool()
        want = torch.zeros_like(routing_map).scatter_(1, target.to(routing_map.device), True)
        differs = (routing_map != want).any(dim=-1) & known.to(routing_map.device)
        self._counts += torch.tensor(
            [float(differs.sum()), float(known.sum())], dtype=torch.float64
        )

    # ------------------------------------------------------------------ targets

    def set_micro_batch(self, mb: Any) -> None:
        """Give every router of this rank its targets for micro-batch `mb` (its
        `data["routed_experts_B_T_X"]`, `lengths_B`) before the forward."""
        routed = mb.data.get("routed_experts_B_T_X")
        if routed is None:
            return
        B, T, X = routed.shape
        K = self.top_k
        layers = self.config.num_layers
        if X != layers * K:
            raise ConfigError(
                f"loss.routing_replay: the rollout engine returned {X} expert ids per token, "
                f"the student has {layers} layers x top-{K} = {layers * K}"
            )
        pos = torch.arange(T).unsqueeze(0)
        # recorded positions: tokens 0..len-2 of each real row (len - 1 tokens fed)
        known_B_T = (pos < (mb.lengths_B.view(-1, 1) - 1)) & (routed >= 0).all(dim=-1)
        x = routed.view(B, T, layers, K).long()
        filler = torch.arange(K).expand(B, T, layers, K)
        x = torch.where(known_B_T[:, :, None, None], x, filler)
        tp = dist.get_world_size(self.pgs.tp) if self.pgs.tp is not None else 1
        lo, hi = 0, T
        if self.config.sequence_parallel and tp > 1:
            rank = dist.get_rank(self.pgs.tp)
            lo, hi = rank * T // tp, (rank + 1) * T // tp
        x = x.transpose(0, 1)[lo:hi]  # [S_local, B, L, K]: the router's token order
        known = known_B_T.transpose(0, 1)[lo:hi].reshape(-1)
        for router in self.routers:
            target = x[:, :, router.layer_number - 1].reshape(-1, K).contiguous()
            self._targets[id(router)] = (target, known)
            if self.replay:
                replay = router.router_replay
                if not self.config.recompute_granularity:
                    # nothing pops the backward FIFO without recomputation: keep it from
                    # holding every micro-batch's targets until the end of the step
                    replay.replay_backward_list.clear()
                replay.set_target_indices(target)

    def mismatch(self) -> tuple[float, float]:
        """(token-layer pairs routed differently, pairs compared), summed over the world
        (a collective: every rank must call it)."""
        counts = self._counts.clone()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dev = (
                torch.device("cuda", torch.cuda.current_device())
                if dist.get_backend() == "nccl"
                else torch.device("cpu")
            )
            moved = counts.to(dev)
            dist.all_reduce(moved)
            counts = moved.cpu()
        return float(counts[0]), float(counts[1])
