"""What varies within an identity: head poses (`poses`, rendered as EMOCA-style normal maps
by `render`) and FLAME expressions (`expressions`: a random prior, a file, or SMIRK on
reference photos)."""
