"""The MLflow tracking API's use-cases: `tracking` (experiments, runs, logging, history on our
own use-cases and ports), `search` (MLflow's filter and order_by grammar, pure) and `steps`
(the mapping of MLflow steps onto our series, pure). Must not import the edges or storage."""
