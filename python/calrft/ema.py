"""The EMA teacher of CaRot's self-distillation and its momentum schedule (objective.md)."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch


@dataclass
class EmaSchedule:
    """m rises linearly from m_start to m_end over the first `warmup_fraction` of all steps, then
    stays at m_end; the teacher is updated every `every` steps and at the last step."""
    total_steps: int
    m_start: float = 0.05
    m_end: float = 0.9
    warmup_fraction: float = 0.2
    every: int = 500

    def __post_init__(self):
        if self.total_steps < 1:
            raise ValueError("total_steps: must be >= 1")
        if self.every < 1:
            raise ValueError("every: must be >= 1")
        for name in ("m_start", "m_end"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}: must lie in [0, 1]")
        if not 0.0 <= self.warmup_fraction <= 1.0:
            raise ValueError("warmup_fraction: must lie in [0, 1]")

    def momentum(self, step: int) -> float:
        ramp = self.warmup_fraction * self.total_steps
        if ramp <= 0 or step >= ramp:
            return self.m_end
        return self.m_start + (self.m_end - self.m_start) * step / ramp

    def should_update(self, step: int) -> bool:
        """`step` counts completed optimiser steps (1-based)."""
        return step % self.every == 0 or step == self.total_steps


def make_teacher(model: torch.nn.Module) -> torch.nn.Module:
    teacher = copy.deepcopy(model)
    teacher.requires_grad_(False)
    teacher.eval()
    return teacher


@torch.no_grad()
def ema_update(teacher: torch.nn.Module, student: torch.nn.Module, momentum: float) -> None:
    """teacher <- m * teacher + (1 - m) * student, on parameters and floating buffers. Every rank
    holds identical students (DDP), so every rank's teacher follows identically."""
    t_state, s_state = teacher.state_dict(), student.state_dict()
    for name, t in t_state.items():
        s = s_state[name]
        if t.is_floating_point():
            t.mul_(momentum).add_(s.detach().to(t.dtype), alpha=1.0 - momentum)
        else:
            t.copy_(s)
