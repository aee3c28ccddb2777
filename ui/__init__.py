"""The Gradio front end of the pruning lab: tab builders and the glue between widgets and Recipes.

Layout and wiring only: it builds ``Recipe``s and hands every job to ``evaluation.Lab`` and the
evaluation modules (studies, allocation, tasks, generation), so the app, the CLI and the studies
run the same code. Tabs import ``ui.common``, ``engine``, ``recipes`` and ``plots``, never each other.
"""
