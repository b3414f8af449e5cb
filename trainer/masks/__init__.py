"""Masks: `<stem>-masklabel.png` files beside training images (white = focus).

`store` reads and writes them safely; `generate` fills a folder automatically (CLIPSeg, alpha
channel, colour key); `painted` turns what the page's canvas returns into a mask.
"""
