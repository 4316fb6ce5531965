"""Dense -> MoE checkpoint surgery: ``convert`` (the plan and the stream), ``dense_mlp`` (one MLP read in the
experts' layout), ``segments`` (which neurons go to which copy, segment or the shared expert), ``calibrate``
(activation statistics that choose the shared neurons), ``writer`` (shards), ``export`` (stock formats)."""
