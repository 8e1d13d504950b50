"""Evaluation against any OpenAI-compatible server: fork/join (or plain) rollouts of held-out
problems, their metrics (accuracy, T, critical path L, speedups) and the HTML reports."""
