"""Training modes: each hands its problems (loop.Problem) and their loss to the one loop (loop.py).

  end_to_end  the logit KL through the whole merged model (the default)
  layerwise   one group at a time on cached hidden states (a device that holds one layer)
"""
