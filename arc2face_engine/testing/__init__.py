"""Stand-in models in the published layouts, with random weights: tiny ones for tests, the
demo and `arc2face-synth models tiny` (`tiny_models`, `tiny_faces`), full-size ones for
benchmarks (`full_size_faces`). Shipped because the CLI's demo uses them; nothing at run
time imports this package."""
