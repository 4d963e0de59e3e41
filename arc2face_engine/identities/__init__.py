"""Who is in a dataset: identity embeddings sampled at random, read from files, embedded
from photos (`sources`), packed apart on the hypersphere (`packing`), kept away from real
people (`exclusion`), with exact blocked cosine search (`neighbours`)."""
