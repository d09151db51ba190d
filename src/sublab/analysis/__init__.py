"""Analysis: statistics across units, run reports and sweep reports, figures."""
