"""SGD-SaI on FSDP2 shards (DTensor parameters): the same math on each rank's local shard, with the whole-tensor
statistics reduced over the shard group, so every rank holds exactly the shard of what one device computes
(docs/multi_gpu.md). A mixin of :class:`memopt.optim.sgdsai.SGDSaI`."""

from __future__ import annotations

import torch

from memopt.functional import sgdsai as _reference
from memopt.functional.sgdsai import normalized_gradient, sgdsai_update_foreach_
from memopt.kernels import load as load_kernels


class ShardedSGDSaIMixin:
    @torch.no_grad()
    def init_state(self) -> None:
        """Create the state of every trainable parameter now, instead of at its first gradient: a zero momentum
        buffer (a DTensor for FSDP2 parameters), and ``step`` 0 (``scale="factored"``) or ``gsnr`` 0.0 (not
        computed yet) and ``started`` False (the next gradient is the first: ``m = g``). The FSDP2 path does this
        at its first step. Call it on a fresh optimizer before loading a ``torch.distributed.checkpoint``
        checkpoint into it: DCP fills only the keys its template (``get_optimizer_state_dict``) already holds.
        8-bit state: zero codes and block maxima (row blocks, sharded with the parameter's rows)."""
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state[p]
                if not p.requires_grad:
                    continue
                if group["scale"] == "factored":
                    if "step" not in st:
                        self._zero_momentum(group, p)
                        st["step"] = 0
                elif "started" not in st:
                    has = "momentum_buffer" in st or "momentum_codes" in st
                    self._create_state(group, p)
                    st.setdefault("gsnr", 0.0)
                    st["started"] = has

    def _step_sharded(self) -> None:
        """The step for FSDP2 (DTensor) parameters: the same math on each rank's local shard, with the whole-tensor
        statistics (g-SNR, finiteness) reduced over the shard group, so every rank holds exactly the shard of what
        one device would compute. State is created for every trainable parameter at its first step() (a DTensor
        momentum buffer, ``gsnr`` 0.0 = not computed yet, ``started``), so the template that
        ``torch.distributed.checkpoint`` builds for a fresh optimizer has every key a checkpoint holds."""
        from memopt.distributed import gsnr_many, local

        if self.gradient_release:
            raise RuntimeError("gradient release is not supported with FSDP2 parameters")
        self.init_state()
        work = []
        paths = [0, 0]  # tensors updated by the Triton kernels, by the PyTorch reference
        for group in self.param_groups:
            if group["scale"] == "factored":
                self._step_sharded_factored(group, paths)
                continue
            params, grads = self._collect(group)
            need = [i for i, p in enumerate(params) if group["scale"] != "sqrt_numel" and not self.state[p]["gsnr"]]
            for i, s in zip(need, gsnr_many([grads[i] for i in need], group["eps"])):
                self._store_gsnr(self.state[params[i]], s)
            work.append((group, params, grads))
        gsnr_max = self._running_gsnr_max()
        for group, params, grads in work:
            lr, wd, beta = group["lr"], group["weight_decay"], group["momentum"]
            ps, gs, bufs, scales, firsts = [], [], [], [], []
            for p, g in zip(params, grads):
                scale = self._scale_of(group, p, gsnr_max)
                if scale is None:  # all-zero gradient so far: only the decoupled decay
                    local(p).mul_(1.0 - lr * wd)
                    continue
                st = self.state[p]
                first = not st["started"]
                st["started"] = True
                common = dict(lr=lr, scale=scale, momentum=beta, weight_decay=wd, first_step=first,
                              maximize=group["maximize"], stochastic_rounding=group["stochastic_rounding"])
                lp, lg = local(p), local(g)
                impl = self._shard_impl(group, lp, lg, paths, "momentum_codes" in st)
                if "momentum_codes" in st:  # 8-bit: the same row blocks as on one device, on the local rows
                    impl.sgdsai_update_8bit_(lp, lg, local(st["momentum_codes"]), local(st["momentum_absmax"]),
                                             blocksize=group["blocksize"], **common)
                    continue
                if beta != 0.0 and first:
                    local(st["momentum_buffer"]).copy_(lg)
                buf = local(st["momentum_buffer"]) if beta != 0.0 else None
                if impl is not _reference:
                    impl.sgdsai_update_(lp, lg, buf, **common)
                    continue
                if buf is not None:
                    bufs.append(buf)
                ps.append(lp)
                gs.append(lg)
                scales.append(scale)
                firsts.append(first)
            if ps:
                sgdsai_update_foreach_(ps, gs, bufs if beta != 0.0 else None, lr=lr, scales=scales, momentum=beta,
                                       weight_decay=wd, maximize=group["maximize"], first_steps=firsts,
                                       stochastic_rounding=group["stochastic_rounding"])
        self._record_paths(*paths)

    def _shard_impl(self, group: dict, lp, lg, paths: list, eight_bit: bool):
        """The module whose update runs on a local shard: the Triton kernels where the single-device rules pick them
        (CUDA, triton installed, self-checked; ``use_triton``), else the PyTorch reference; counted in ``paths``."""
        fused = self._use_triton(group, lp, lg, "sgdsai", eight_bit)
        paths[0 if fused else 1] += 1
        return load_kernels("sgdsai") if fused else _reference

    def _step_sharded_factored(self, group: dict, paths: list) -> None:
        """``scale="factored"`` on FSDP2 shards: rows are whole on each rank (FSDP2 shards dim 0), so only the
        column statistics are summed over the shard group; the update is then elementwise on the local shard."""
        from memopt.distributed import any_nonzero, column_reducer, local

        params, grads = self._collect(group)
        started = [bool(self.state[p]["step"]) for p in params]
        nonzero = any_nonzero([g for g, s in zip(grads, started) if not s])
        lr, wd, beta = group["lr"], group["weight_decay"], group["momentum"]
        for p, g, s in zip(params, grads, started):
            st = self.state[p]
            if not s and not nonzero.pop(0):  # waits for its first non-zero gradient: only the decay
                local(p).mul_(1.0 - lr * wd)
                continue
            st["step"] += 1
            u = normalized_gradient(local(g), group["eps"], clip=group["clip"],
                                    reduce_columns=column_reducer(g)).to(g.dtype)
            common = dict(lr=lr, scale=1.0 / (1.0 - beta ** st["step"]) if beta else 1.0, momentum=beta,
                          weight_decay=wd, maximize=group["maximize"], first_step=False,
                          stochastic_rounding=group["stochastic_rounding"])
            impl = self._shard_impl(group, local(p), u, paths, "momentum_codes" in st)
            if "momentum_codes" in st:
                impl.sgdsai_update_8bit_(local(p), u, local(st["momentum_codes"]), local(st["momentum_absmax"]),
                                         blocksize=group["blocksize"], **common)
            else:
                impl.sgdsai_update_(local(p), u, local(st["momentum_buffer"]) if beta != 0.0 else None, **common)
