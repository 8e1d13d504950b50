"""The two-stage parallel trajectory generator (method.md section 5), a preprocessing step.

- Stage 1 (:mod:`.stage1`): an LLM behind any OpenAI-compatible chat API rewrites
  correct sequential traces into parallel trajectories in four checked steps; the
  format module validates the result.
- Stage 2 (:mod:`.stage2`): the SFT model, served by vLLM, samples its own
  fork/join trajectories; the format-valid, answer-correct ones become the next
  round's SFT data.

Both are resumable (:mod:`.records`) and run from one CLI (:mod:`.cli`).
"""
