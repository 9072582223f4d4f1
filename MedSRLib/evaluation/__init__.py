"""Measuring models: the held-out benchmark and its report, the through-plane benchmark,
bf16 and int8 costs (and the int8 exports they validate), and the demo picture.
Stands on everything; nothing in the library imports it.
"""
