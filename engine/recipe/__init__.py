"""mergekit recipes: one YAML document read as a merge's arguments, parameter values per tensor
(gradients over layers, filters), and multi-document stages. The only room that knows YAML; the run
core does not import it."""
