"""The Gradio front end of the pruning lab: tab builders and the glue between widgets and Recipes.

Nothing here prunes or evaluates by itself; it builds ``Recipe``s and calls ``evaluation.Lab``,
the ``Pruner`` and the evaluation modules, so the app, the CLI and the studies run the same code.
"""
