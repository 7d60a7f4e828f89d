"""Lightning callbacks for continual fine-tuning: freezing policy, spectral bound, evaluation, adapters."""
