"""``SearchConfig``: the settings of reward-guided sampling (``dina-lrm sample``, :class:`dina_lrm.search.Searcher`),
each declared once with its help; torch-free, so ``dina-lrm --help`` stays instant."""

from __future__ import annotations

from dataclasses import dataclass

from dina_lrm.config import LATENT_U, parse_levels, setting

STRATEGIES = ("best_of_n", "prune", "beam")


@dataclass
class SearchConfig:
    strategy: str = setting("prune", "best_of_n, prune (prune-and-continue) or beam", choices=STRATEGIES)
    n: int = setting(16, "candidates started per prompt")
    keep: int = setting(4, "survivors after the last checkpoint (prune, beam)")
    at: list[float] = setting(factory=lambda: [0.6, 0.3], help="checkpoint sigmas, decreasing, in (0, 1), e.g. 0.6,0.3",
                              parse=parse_levels, flags=("--at",), metavar="SIGMAS")
    steps: int = setting(28, "sampling steps")
    guidance_scale: float | None = setting(None, "classifier-free guidance (default: the pipeline's own)")
    negative_prompt: str = setting("", "negative prompt of the guidance")
    resolution: int | None = setting(None, "image side in pixels (default: the transformer's native size)")
    max_sequence_length: int | None = setting(None, "text tokens of the generator's own conditioning (default: its encoder's; --toy: the toy's)")
    beam_noise_level: float = setting(0.7, "beam: SDE noise of the steps after the first checkpoint")
    final_u: float = setting(LATENT_U, "the final choice: DiNa-LRM on the clean latents at this u")
    seed: int = setting(0, "prompt i uses seed + i")

    def validate(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; choose one of {STRATEGIES}")
        if self.n < 1 or not 1 <= self.keep <= self.n:
            raise ValueError(f"need 1 <= keep <= n, got n={self.n}, keep={self.keep}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.strategy != "best_of_n":
            if not self.at:
                raise ValueError(f"the {self.strategy} strategy needs checkpoint sigmas (--at)")
            if any(not 0 < s < 1 for s in self.at) or any(a <= b for a, b in zip(self.at, self.at[1:])):
                raise ValueError(f"checkpoint sigmas must decrease strictly and lie in (0, 1), got {self.at}")

    def survivors(self) -> list[int]:
        """How many candidates each checkpoint keeps: geometric from n down to keep."""
        count = len(self.at)
        return [max(self.keep, round(self.n * (self.keep / self.n) ** ((j + 1) / count))) for j in range(count)]
