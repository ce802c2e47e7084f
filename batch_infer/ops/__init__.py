"""Operating jobs: submitting them to clusters, scheduling them, querying their outputs."""
