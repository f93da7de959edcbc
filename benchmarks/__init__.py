"""Side-by-side benchmarks of prompt_tuning against Hugging Face PEFT (see benchmarks/run.py)."""
