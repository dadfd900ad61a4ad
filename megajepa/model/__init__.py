"""The model side of the packed pass, for any supported Hugging Face causal-LM family.

    build.build_model(cfg, tokenizer, dtype=, ds_config=, seed=)   the CausalLM (ZeRO-3 from birth);
                                                  refuses a family it cannot run exactly, first
    families.decoder_of(lm)                        the decoder body: (input_ids, position_ids,
                                                  attention_mask) -> last_hidden_state
    attention.attention_mask(batch, lm, prefix="") what that body takes as attention_mask for the
                                                  batch's sequence / prefix_sequence / prefix_length
                                                  / position_ids (prefix "teacher_" for the teacher)
    head.lm_logits(lm, hidden)                     logits exactly as lm's own forward makes them
    head.lm_cross_entropy(lm, hidden[N, d], labels[N])  mean CE at labelled tokens, memory-bounded
    head.token_cross_entropy(lm, hidden, labels)   the same, per token [N] (per-source metrics)
    head.HeadLoss(lm)(lm, final[R, L, d], batch)  the batch's CE (and per-source sums), as one
                                                  module call that gathers the head once under
                                                  ZeRO-3 (JepaModel's CE)
    head.LOGIT_TRANSFORMS                          what families do to the head's output, for every path
    predictor.build_predictor(kind, d)             the LLM-JEPA head pred (jepa.predictor);
    predictor.LinearPredictor(d)                   STP's (jepa.stp.linear_predictor)
    attention.bucket_width(width)                  the row width to pad to for FlexAttention
"""
