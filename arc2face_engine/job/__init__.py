"""The production job in plain Python (no Prefect): what the generate flow orchestrates.

In the order a job runs: `spec_paths` (the paths a spec names exist), `preflight`
(everything a user can get wrong, before anything is written), `lifecycle` (the dataset opened, marked in progress, finalised and counted),
`identities_step` (the identities table built or re-read), `shards` (the streaming shard
plan), `workers` (per-process models and banks; one shard on a device), `shard` (generate
-> verify -> top up -> write -> commit), `output_checks` (the output location and resume
compatibility); `direct` runs the whole job in a plain loop and `estimate` is what
`arc2face-synth plan` prints.
"""
