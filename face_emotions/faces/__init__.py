"""Faces in photographs: find them (MTCNN), and crop each the one way training and serving share.

Real photos have backgrounds, off-centre faces and several people; the model was trained on
tight face crops. Detection finds every face, :func:`face_emotions.faces.crop.crop_face` cuts a
square around each with the margin the model version was trained with, and the model sees the
same kind of input in training, evaluation and serving.
"""
