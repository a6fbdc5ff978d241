class PreviewImage:
    def __init__(self, image, animated=False, cls=None):
        self.image = image
