"""Code coupled to other frameworks; each subpackage is what would go upstream to its framework."""
