"""IPython magics: %%task and %flow."""
