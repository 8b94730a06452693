"""The Pareto lab: sweeps of methods x budgets x datasets x seeds, a results database, reports.

- `sweep.run_sweep(SweepSpec(...), "results.db")`: train the grid, resumably (`ue bench`);
- `report.write_report("results.db", "report/")`: tables, frontiers, plots (`ue report`);
- `inspect.inspect_collisions(dataset, method, budget)`: collision diagnostics (`ue inspect`);
- `decomposition.decompose(network, vocabularies)`: the feature-multiplexing decomposition;
- `commands`: the argparse wiring of the three commands.
"""

from unified_embedding.bench.store import ResultStore
from unified_embedding.bench.sweep import SweepSpec, SweepSummary, run_sweep

__all__ = ["ResultStore", "SweepSpec", "SweepSummary", "run_sweep"]
