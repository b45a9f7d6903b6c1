"""DeepSpeed token MoE: deepspeed.moe.layer.MoE (expert parallel over the EP group) + our shared experts.

Shape legend: N rows, V valid rows, D width, F hidden, E experts, K top-k.

Facts about DeepSpeed 0.19.8's gate (deepspeed/moe/sharded_moe.py) this wrapper relies on:
- k=2 (top2gating) and k>2 (topkgating): softmax of fp32 logits x W_g^T, experts = top-k of the
  probabilities (k=2: argmax, then argmax of the logits with the first masked), weights = the k
  probabilities divided by their sum (clamped at eps). This is exactly `route_from_logits`, so with
  `top2_2nd_expert_sampling=False`, `use_rts=False`, `noisy_gate_policy=None` and `drop_tokens=False`
  the layer computes the same function as LocalTokenMoE. k=1 (top1gating) weights by the raw
  probability instead, so MoEConfig.validate() refuses k=1 for this backend.
- `used_token` (a padding mask) is honoured only by top1gating, so padding rows are routed and
  computed. We overwrite each padding row with a (detached) copy of a valid row so padding spreads over
  experts like real tokens (all-zero rows would all pick the same 2 experts and inflate the dropless
  capacity, i.e. the dense [E, C, D] buffer), and zero the padding rows of the output, which also
  stops any gradient through them. With routing='static' (DeepSpeed's capacity policy) padding rows do compete for capacity.
- DeepSpeed's l_aux and exp_counts include padding rows (and l_aux is NaN at 0 rows), so we ignore
  them and recompute lb loss, z-loss and counts from the gate's own `wg` on the valid rows.
- Dropless capacity C is the max expert count all-reduced over the EP group; the all-to-all then moves
  [E, C, D] per rank. CALLER GUARANTEE: every rank of the EP group calls forward of every DeepSpeed
  TokenMoE in the same order with the same N >= 1 (pad with valid_N=False rows). A rank with N=0 gets a
  NaN l_aux inside DeepSpeed, and unequal N aborts gloo's all-to-all for k=1; N=0 raises here.

Parameter-name mapping (state dicts of this module vs LocalTokenMoE, see the helpers below):
    moe.deepspeed_moe.gate.wg.weight [E, D]                         <-> router.gate.weight
    moe.deepspeed_moe.experts.deepspeed_experts.<i>.w1.weight [F, D] <-> experts.w1_EFD[g]   (g = ep_rank*E_local + i)
    moe.deepspeed_moe.experts.deepspeed_experts.<i>.w3.weight [F, D] <-> experts.w3_EFD[g]
    moe.deepspeed_moe.experts.deepspeed_experts.<i>.w2.weight [D, F] <-> experts.w2_EDF[g]
    shared.w{1,3,2}.weight                                          <-> shared.w{1,3,2}.weight
Expert parameters carry DeepSpeed's tags `allreduce=False` and `group_name="ep_size_<ep>"` (used for
MoE optimizer param groups and the per-expert checkpoint files).
"""

from __future__ import annotations

from typing import Mapping, Sequence, Union

import torch
import torch.distributed as dist

from .base import ExternalRoutedMoE
from .config import DEFAULT_CAPACITY_FACTOR, MoEConfig
from .experts import SwiGLU

_DS_GATE = "moe.deepspeed_moe.gate.wg.weight"
_DS_EXPERT = "moe.deepspeed_moe.experts.deepspeed_experts.{i}.{w}.weight"
_LOCAL_EXPERT = {"w1": "experts.w1_EFD", "w3": "experts.w3_EFD", "w2": "experts.w2_EDF"}
_SHARED_PREFIX = "shared."


class DeepSpeedTokenMoE(ExternalRoutedMoE):
    """Token MoE on deepspeed.moe.layer.MoE; this rank holds experts [ep_rank*E_local, (ep_rank+1)*E_local)."""

    def __init__(self, cfg: MoEConfig, dim: int) -> None:
        super().__init__()
        from deepspeed.moe.layer import MoE

        cfg.validate()
        self.num_experts, self.top_k, self.ep_size = cfg.num_experts, cfg.top_k, cfg.ep_size
        self.dim, self.hidden = dim, cfg.hidden_dim(dim)
        dropless = not cfg.static
        factor = None if dropless else (cfg.capacity_factor or DEFAULT_CAPACITY_FACTOR)
        # Initial weights are a function of the seed, not of the parallel layout: draw every expert exactly as
        # the local backend does (same RNG stream), build DeepSpeed's layer without touching the global RNG,
        # then keep this rank's slice. So ep_size 1 and 2, and the local backend, start from the same model.
        from .local import LocalTokenMoE

        reference = LocalTokenMoE(cfg, dim).state_dict()
        with torch.random.fork_rng(devices=[]):
            self.moe = MoE(
                hidden_size=dim,
                expert=SwiGLU(dim, self.hidden),  # deep-copied E/ep_size times; overwritten below
                num_experts=cfg.num_experts,
                ep_size=cfg.ep_size,
                k=cfg.top_k,
                capacity_factor=1.0 if dropless else factor,
                eval_capacity_factor=1.0 if dropless else factor,
                min_capacity=0 if dropless else 4,
                use_residual=False,
                noisy_gate_policy=None,
                drop_tokens=not dropless,
                use_rts=False,
                top2_2nd_expert_sampling=False,
            )
            self.shared = SwiGLU(dim, cfg.shared_hidden_dim(dim)) if cfg.num_shared_experts > 0 else None
        self.load_state_dict(deepspeed_state_from_local(reference, self.ep_rank(), cfg.ep_size))

    @property
    def gate_weight(self) -> torch.Tensor:
        """Router weight [E, D] (DeepSpeed's TopKGate.wg)."""
        return self.moe.deepspeed_moe.gate.wg.weight

    def init_expert_groups(self) -> None:
        """Create/attach DeepSpeed's expert-parallel group unless deepspeed.initialize already did.

        Not named `set_deepspeed_parallelism`: the engine calls that on every module that has it, and a
        second call on the same gate trips DeepSpeed's 'override an existing ep_group' assertion.
        forward calls this lazily only for ep_size > 1 (ep_size 1 needs no group), so with ep_size > 1
        run no forward before deepspeed.initialize, or the engine's own call will trip that assertion.
        """
        if self.moe.deepspeed_moe.ep_group is None and dist.is_available() and dist.is_initialized():
            self.moe.set_deepspeed_parallelism()

    def ep_rank(self) -> int:
        """This rank's index in the expert-parallel group (0 without distributed), also before
        ``deepspeed.initialize`` created the group: DeepSpeed groups consecutive ranks
        (``[0..ep-1], [ep..2ep-1], ...``), so it is ``rank % ep_size``."""
        group = self.moe.deepspeed_moe.ep_group
        if group is not None:
            return dist.get_rank(group=group)
        return dist.get_rank() % self.ep_size if dist.is_available() and dist.is_initialized() else 0

    def routed(self, x_ND: torch.Tensor) -> torch.Tensor:
        if x_ND.shape[0] == 0:
            raise ValueError("DeepSpeedTokenMoE: got N=0 rows; every EP rank must call with the same N >= 1 "
                             "(pad with valid_N=False rows)")
        if self.ep_size > 1:
            self.init_expert_groups()
        out_ND, _ds_l_aux, _ds_counts = self.moe(x_ND)  # DeepSpeed's l_aux/counts include padding: ours are used
        return out_ND


def deepspeed_state_from_local(local_state: Mapping[str, torch.Tensor], ep_rank: int = 0,
                               ep_size: int = 1) -> dict[str, torch.Tensor]:
    """State dict for the DeepSpeedTokenMoE on EP rank `ep_rank` from a LocalTokenMoE state dict."""
    w1_EFD = local_state[_LOCAL_EXPERT["w1"]]
    num_experts = w1_EFD.shape[0]
    if num_experts % ep_size:
        raise ValueError(f"deepspeed_state_from_local: E={num_experts} not divisible by ep_size={ep_size}")
    per_rank = num_experts // ep_size
    out = {_DS_GATE: local_state["router.gate.weight"].clone()}
    for i in range(per_rank):
        g = ep_rank * per_rank + i
        for w, name in _LOCAL_EXPERT.items():
            out[_DS_EXPERT.format(i=i, w=w)] = local_state[name][g].clone()
    out.update({k: v.clone() for k, v in local_state.items() if k.startswith(_SHARED_PREFIX)})
    return out


def local_state_from_deepspeed(
        ds_states: Union[Mapping[str, torch.Tensor], Sequence[Mapping[str, torch.Tensor]]]) -> dict[str, torch.Tensor]:
    """LocalTokenMoE state dict from DeepSpeedTokenMoE state dicts, one per EP rank in EP-rank order
    (a single mapping for ep_size=1). The gate and shared weights are replicated: taken from rank 0."""
    states = [ds_states] if isinstance(ds_states, Mapping) else list(ds_states)
    if not states:
        raise ValueError("local_state_from_deepspeed: no state dicts given")
    experts = {w: [] for w in _LOCAL_EXPERT}
    for rank, state in enumerate(states):
        i = 0
        while _DS_EXPERT.format(i=i, w="w1") in state:
            for w in _LOCAL_EXPERT:
                experts[w].append(state[_DS_EXPERT.format(i=i, w=w)])
            i += 1
        if i == 0:
            raise ValueError(f"local_state_from_deepspeed: state {rank} has no key {_DS_EXPERT.format(i=0, w='w1')}")
    out = {"router.gate.weight": states[0][_DS_GATE].clone()}
    out.update({_LOCAL_EXPERT[w]: torch.stack(ws) for w, ws in experts.items()})
    out.update({k: v.clone() for k, v in states[0].items() if k.startswith(_SHARED_PREFIX)})
    return out
