"""The QSVD paper's tables, regenerated: their layout and published numbers (published.yaml, read by
qsvd.paper.tables), one model's slice of a table from its evaluation results (qsvd.paper.slices), and the table laid
out as the paper lays it out, ours beside the paper's (qsvd.paper.render)."""
