from . import model_management

updates = []


class ProgressBar:
    def __init__(self, total, node_id=None):
        self.total, self.current = total, 0

    def update_absolute(self, value, total=None, preview=None):
        model_management.throw_exception_if_processing_interrupted()
        self.current = value
        updates.append((value, total or self.total, preview is not None))

    def update(self, value):
        self.update_absolute(self.current + value)
