"""Carbon of inference: grid intensity and its sources, operational and embodied grams CO2e.

``intensity``: the bundled region table and energy -> operational gCO2e. ``embodied``: the
hardware's manufacturing emissions per GPU-second. Intensity sources, one per module:
``static``, ``time_series_file``, ``electricity_maps``; ``providers`` chooses one from the
settings and checks it at start-up. Nothing here imports the rest of the plugin.
"""
