"""Example problems (installed as ``evotorch_mqa_moe.problems``)."""
