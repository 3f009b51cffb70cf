"""NAS auto pruning: analytic counts (counting.py), the search space and fitting candidates (space.py),
scoring the top-k and picking the winner (nas.py), argparse flags (args.py), a plot of the candidates (plot.py)."""
