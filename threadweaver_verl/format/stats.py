"""Token statistics of a trajectory: T (total) and L (critical path).

T counts every response token. L counts tokens outside blocks fully; a block
counts its own sequential part (tags, outlines, gaps) plus the largest L among
its threads, recursively for nested blocks. Works on partial (truncated) trees.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from threadweaver_verl.format.tree import Block, Thread, Trajectory, node_length


@dataclass(frozen=True)
class TrajectoryStats:
    total_tokens: int  # T
    critical_path: int  # L
    num_blocks: int  # all blocks, nested ones included
    threads_per_block: tuple[int, ...] = field(default=())
    thread_tokens: int = 0  # tokens inside threads (outermost threads)
    max_depth: int = 0

    @property
    def speedup(self) -> float:
        """Token-latency speedup T / L (1.0 for an empty or sequential trajectory)."""
        return self.total_tokens / self.critical_path if self.critical_path else 1.0

    @property
    def parallel_ratio(self) -> float:
        """Share of the response's tokens that are inside threads."""
        return self.thread_tokens / self.total_tokens if self.total_tokens else 0.0

    @property
    def num_threads(self) -> int:
        return sum(self.threads_per_block)

    def as_dict(self) -> dict:
        return {
            "total_tokens": self.total_tokens,
            "critical_path": self.critical_path,
            "num_blocks": self.num_blocks,
            "num_threads": self.num_threads,
            "threads_per_block": list(self.threads_per_block),
            "thread_tokens": self.thread_tokens,
            "max_depth": self.max_depth,
            "speedup": self.speedup,
            "parallel_ratio": self.parallel_ratio,
        }


def compute_stats(traj: Trajectory, length=len) -> TrajectoryStats:
    """T, L and block counts. For an id tree ``length=len`` counts tokens."""
    threads_per_block: list[int] = []
    max_depth = 0

    def crit_line(nodes, depth: int) -> int:
        return sum(crit_block(n, depth + 1) if isinstance(n, Block) else node_length(n, length) for n in nodes)

    def crit_block(b: Block, depth: int) -> int:
        nonlocal max_depth
        max_depth = max(max_depth, depth)
        threads = b.threads
        threads_per_block.append(len(threads))
        own = node_length(b, length) - sum(node_length(t, length) for t in threads)
        longest = max((crit_thread(t, depth) for t in threads), default=0)
        return own + longest

    def crit_thread(t: Thread, depth: int) -> int:
        tags = 1 + (1 if t.closed else 0)
        return tags + crit_line(t.body, depth)

    total = node_length(traj, length)
    critical = crit_line(traj.body, 0)
    thread_tokens = sum(node_length(t, length) for b in traj.blocks for t in b.threads)
    return TrajectoryStats(total, critical, len(threads_per_block), tuple(threads_per_block), thread_tokens, max_depth)
