"""Reading stacks: what a stack is and how its files become pixels.

Owns the 28 locations and four channels (`labels`), the rejection a file or stack gets
(`errors`), file hashes and the stack fingerprint (`digest`), file names -> stack id and
channel (`naming`), decoding and checking one channel file (`image`), one stack of four
(`stack`), the pixels a model is given (`preprocess`) and cheap image-quality figures and
checks (`quality`). The bottom room: it may import
numpy, OpenCV and the standard library, and nothing else of the project.
"""
