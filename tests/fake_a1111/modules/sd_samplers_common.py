"""modules.sd_samplers_common: interrupts end sampling with the last latent."""


class InterruptedException(BaseException):
    pass
