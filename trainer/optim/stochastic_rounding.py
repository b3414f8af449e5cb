"""bfloat16 weights trained in place, with stochastic rounding (`optimizer.stochastic_rounding`,
OneTrainer's key).

A fine-tuned part normally trains float32 master weights whatever its `weight_dtype`
(trainer/finetune.py): an update smaller than half a bfloat16 step (1/256 of the weight) is
lost when rounded to the nearest bfloat16, so a weight updated in bfloat16 with a small
learning rate stops moving. With stochastic rounding on, a part stored in BFLOAT_16 keeps its
bfloat16 weights as the trained parameters (2 bytes a weight instead of 4, and bfloat16
gradients) and each update is rounded to one of the two neighbouring bfloat16 values at
random, up with probability equal to the distance from the lower one ("Revisiting BFloat16
Training", Zamirai et al. 2020): every update moves the weight by the right amount *on
average*, so small updates add up instead of vanishing.

How a step runs: the optimizer's own update is computed on a float32 copy of the weights, a
bucket of parameters at a time (the optimizer's groups narrowed to them, as the fused backward
pass does: trainer/optim/fused.py), then rounded back into the bfloat16 weights; only a
bucket's float32 copy exists at any time. So every optimizer whose update of a weight depends
on that weight's own gradient and state works unchanged (AdamW, 8-bit AdamW, Adafactor, Lion,
SGD); Prodigy, whose step size sums over all weights, is refused. The optimizer's state is
created from the float32 copy and stays float32 (AdamW's moments: 8 bytes a weight; held in
bfloat16 they would lose the same small updates). Loading a backup, torch casts each state to
its weight's type: for torch's own optimizers (AdamW, SGD, Adafactor) the float32 values are
put back from the backup itself; bitsandbytes' (8-bit AdamW, Lion) load without torch's hooks,
so their float32 states come back through bfloat16 once (made float32 again before use).

The random bits come from a generator per device, reseeded at every optimizer call from the
run's seed and the number of calls so far, which the optimizer's first group carries (so a
backup keeps it): a run and its resumed copy draw the same bits.
"""
from __future__ import annotations

import contextlib
import types

import torch

from trainer.config import DataType, Optimizer, TrainConfig, TrainingMethod
from trainer.errors import ConfigError

KEY = "optimizer.stochastic_rounding"
SUPPORTED = (Optimizer.ADAMW, Optimizer.ADAMW_8BIT, Optimizer.ADAFACTOR, Optimizer.LION,
             Optimizer.SGD)
# float32 bytes of weights rounded per optimizer call (with their float32 gradients and the
# random bits, about three times this is alive at once)
BUCKET_BYTES = 128 * 2**20
STEP_KEY = "stochastic_rounding_calls"  # kept in the first parameter group
SEED_KEY = "stochastic_rounding_seed"
LOW_HALF = -65536  # 0xFFFF0000 as int32: the float32 bits a bfloat16 keeps


def requested(config: TrainConfig) -> bool:
    """`optimizer.stochastic_rounding` as given; empty = the optimizer's default (off)."""
    return bool(config.optimizer.stochastic_rounding)


def bfloat16_parts(config: TrainConfig) -> list[str]:
    """The fine-tuned parts stored in BFLOAT_16: where stochastic rounding applies."""
    if config.training_method != TrainingMethod.FINE_TUNE:
        return []
    return [p for p in config.model_type.facts.parts if getattr(config, p).train
            and getattr(config, p).weight_dtype == DataType.BFLOAT_16]


def check_stochastic_rounding(config: TrainConfig) -> None:
    """Refuse stochastic rounding where it would apply but is not implemented."""
    optimizer = config.optimizer.optimizer
    if requested(config) and bfloat16_parts(config) and optimizer not in SUPPORTED:
        raise ConfigError(
            f"{KEY} = true is not implemented for {optimizer.value}: its step size is computed "
            f"from all weights at once, so it cannot update a bucket of bfloat16 weights at a "
            f"time. Use one of {', '.join(o.value for o in SUPPORTED)}, switch {KEY} off (the "
            f"BFLOAT_16 parts then train float32 master weights), or store the parts in "
            f"FLOAT_32.")


def trains_in_place(config: TrainConfig, part: str) -> bool:
    """Whether the fine-tuned `part` trains its bfloat16 weights in place."""
    check_stochastic_rounding(config)
    return requested(config) and part in bfloat16_parts(config)


# --- the rounding ----------------------------------------------------------------------------

def round_into(target: torch.Tensor, source: torch.Tensor, generator: torch.Generator) -> None:
    """Write float32 `source` into bfloat16 `target`, each value rounded to one of its two
    bfloat16 neighbours at random: up with probability (x - lower) / (upper - lower), so the
    expected result is x. `source` is overwritten.

    A bfloat16 is the upper 16 bits of a float32. Adding a uniform random 16-bit number to the
    lower 16 bits carries into the upper ones with exactly that probability; clearing the
    lower bits then leaves a float32 that bfloat16 holds exactly. Sign-magnitude bits make
    this round the magnitude, the same for negative values."""
    bits = source.view(torch.int32)
    bits.add_(torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=bits.device,
                            generator=generator))
    bits.bitwise_and_(LOW_HALF)
    target.copy_(source)


@contextlib.contextmanager
def narrowed(optimizer: torch.optim.Optimizer, params: list[torch.Tensor],
             group_of: dict[torch.Tensor, int]):
    """The optimizer's groups holding only `params` (each in its group, `group_of`), restored
    after: a step then updates exactly these, as a full step would (for optimizers whose update
    of a weight depends only on its own gradient and state). The fused backward pass steps its
    buckets so too."""
    groups = optimizer.param_groups
    kept = [group["params"] for group in groups]
    try:
        for number, group in enumerate(groups):
            group["params"] = [p for p in params if group_of[p] == number]
        yield
    finally:
        for group, members in zip(groups, kept):
            group["params"] = members


class StochasticRounding:
    """Replaces `optimizer.step` (see the module note); `seed` makes the rounding repeatable."""

    def __init__(self, optimizer: torch.optim.Optimizer, seed: int,
                 bucket_bytes: int = BUCKET_BYTES):
        self.optimizer = optimizer
        self.bucket_bytes = bucket_bytes
        self.generators: dict[torch.device, torch.Generator] = {}
        first = optimizer.param_groups[0]
        first.setdefault(SEED_KEY, int(seed))
        first.setdefault(STEP_KEY, 0)
        self._inner_step = optimizer.step
        # A bound method of the optimizer: torch's LR schedulers and accelerate wrap
        # `optimizer.step` by its __func__, which must take the optimizer as `self`.
        optimizer.step = types.MethodType(lambda _, closure=None: self.step(closure), optimizer)
        self._loading: dict | None = None
        optimizer.register_load_state_dict_pre_hook(self._before_load)
        optimizer.register_load_state_dict_post_hook(self._after_load)

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("stochastic rounding steps without a closure")
        group_of = {p: i for i, g in enumerate(self.optimizer.param_groups) for p in g["params"]}
        with_grad = [p for p in group_of if p.grad is not None]
        rounded = [p for p in with_grad if p.dtype == torch.bfloat16]
        plain = [p for p in with_grad if p.dtype != torch.bfloat16]
        self._reseed()
        if plain:
            with narrowed(self.optimizer, plain, group_of):
                self._inner_step()
        for bucket in self._buckets(rounded):
            self._step_rounded(bucket, group_of)
        return None

    def _reseed(self) -> None:
        first = self.optimizer.param_groups[0]
        step = first[STEP_KEY] = int(first[STEP_KEY]) + 1
        seed = (int(first[SEED_KEY]) * 1_000_003 + step) % 2**63
        for generator in self.generators.values():
            generator.manual_seed(seed)
        self._seed = seed

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self.generators:
            self.generators[device] = torch.Generator(device=device)
            self.generators[device].manual_seed(self._seed)
        return self.generators[device]

    def _buckets(self, params: list[torch.Tensor]):
        bucket, size = [], 0
        for param in params:
            bucket.append(param)
            size += param.numel() * 4
            if size >= self.bucket_bytes:
                yield bucket
                bucket, size = [], 0
        if bucket:
            yield bucket

    def _step_rounded(self, params: list[torch.Tensor], group_of) -> None:
        """One optimizer call on float32 copies of `params`, rounded back into them."""
        stored = []
        for param in params:
            weight, grad = param.data, param.grad
            param.data = weight.float()
            param.grad = grad.float()  # the optimizers expect a gradient of the weight's type
            self._state_in_float32(param)
            stored.append(weight)
        try:
            with narrowed(self.optimizer, params, group_of):
                self._inner_step()
        finally:
            for param, weight in zip(params, stored):
                updated = param.data
                param.grad = None  # a float32 gradient cannot stay on a bfloat16 weight
                param.data = weight
                round_into(weight, updated, self._generator(weight.device))

    def _before_load(self, optimizer, state_dict: dict) -> None:
        self._loading = state_dict

    def _after_load(self, optimizer) -> None:
        """Put back the float32 states torch just cast to the bfloat16 weights' type, from
        the state dict itself (torch maps saved ids to parameters in group order)."""
        saved, self._loading = self._loading, None
        ids = [i for group in saved["param_groups"] for i in group["params"]]
        params = [p for group in optimizer.param_groups for p in group["params"]]
        for index, param in zip(ids, params):
            if param.dtype != torch.bfloat16:
                continue
            for key, value in saved["state"].get(index, {}).items():
                if (key != "step" and isinstance(value, torch.Tensor)
                        and value.dtype == torch.float32):
                    optimizer.state[param][key] = value.to(param.device, copy=True)

    def _state_in_float32(self, param: torch.Tensor) -> None:
        state = self.optimizer.state.get(param)
        for key, value in (state or {}).items():
            if (key != "step" and isinstance(value, torch.Tensor) and value.is_floating_point()
                    and value.dtype != torch.float32):
                state[key] = value.float()


def install(optimizer: torch.optim.Optimizer, seed: int | None = None) -> StochasticRounding:
    """Make `optimizer.step()` round its bfloat16 weights stochastically."""
    return StochasticRounding(optimizer, torch.initial_seed() if seed is None else seed)
