"""The names of the statistics a method can declare it needs (see ``hf_wsvd.statistics``)."""

FISHER = "fisher"  # per-entry empirical Fisher of the task loss, out × in
FISHER_ROWS = "fisher_rows"  # the same summed over inputs: one value per output row, O(out)
FISHER_COLS = "fisher_cols"  # summed over outputs: one value per input column, O(in)
GRAM = "gram"  # input second moment E[x xᵀ], in × in
MEAN_ABS = "mean_abs"  # input E|x| per feature, O(in)
TOKEN_COUNTS = "token_counts"  # how often each token id occurs in the data: vocab-sized, of an input embedding
# An experts module's per-expert Gram of its intermediate channels, each routed token weighted by its
# routing weight squared, over all the tokens reaching the module: experts × I × I (``methods.expert_pruning``).
EXPERT_GRAM = "expert_gram"
CROSS = "cross"  # E[x_dense x_compressedᵀ]: a layer's inputs in the dense and the compressed model, in × in

# Statistics of per-example gradients (a forward and backward pass of the task loss) and of the
# layers' inputs (forward passes only, no labels): the built-in ones, and each statistic registered
# later joins its kind (``collectors.register_collector``).
GRADIENT_STATISTICS = {FISHER, FISHER_ROWS, FISHER_COLS}
INPUT_STATISTICS = {GRAM, MEAN_ABS}

# The shape of each built-in statistic of a layer of ``in_features`` inputs and ``out_features``
# outputs (what statistics reused from another run must have).
SHAPES = {FISHER: lambda i, o: (o, i), FISHER_ROWS: lambda i, o: (o,), FISHER_COLS: lambda i, o: (i,),
          GRAM: lambda i, o: (i, i), MEAN_ABS: lambda i, o: (i,), CROSS: lambda i, o: (i, i)}
