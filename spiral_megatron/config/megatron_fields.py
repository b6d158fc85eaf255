"""Every field of megatron-core's TransformerConfig and ModelParallelConfig, classified by hand.

Data only (docs/CONFIG.md, "The three classes"): each field of release 0.16.1 or 0.19.2 is in
exactly one of FUNCTION, RUNTIME or REFUSED, after reading what megatron-core does with it.
A field that a newer megatron-core adds is in none of them until someone reads it:
`tests/unit/test_field_classes.py` fails on it, and the job refuses it by name meanwhile.

Rules used (our choices, applied field by field):
* FUNCTION: the value changes what the trained model computes, so it travels with the model
  (model_args.json, resume, conversion). It must be a plain value (JSON).
* RUNTIME: how the job computes the same function: the parallel layout, precision and FP8
  numerics, fused kernels of the same math, recompute, kernel choices, hooks the job installs.
* REFUSED: a feature SpiralGPTModel or the job does not build (MoE, MLA, context parallelism,
  CUDA graphs, ...), including each knob of such a feature; a field megatron-core's layers never
  read (set elsewhere in Megatron-LM, so a value would be accepted and ignored); a field
  megatron-core itself ignores (deprecated); a Python object derived from a recorded field.
  The job refuses a value other than the default, with the reason below.
"""

from typing import Dict

FUNCTION = frozenset({
    # sizes and shapes
    "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size", "kv_channels",
    # norms, biases, the MLP's activation (bias_activation_fusion: with GeLU, Megatron's fused
    # bias-GeLU/GeGLU is the tanh approximation, fusions/fused_bias_gelu.py; TE's activations too)
    "normalization", "layernorm_epsilon", "layernorm_zero_centered_gamma", "gated_linear_unit",
    "add_bias_linear", "add_qkv_bias", "qk_layernorm", "qk_l2_norm", "activation_func",
    "bias_activation_fusion", "use_te_activation_func", "glu_linear_offset", "activation_func_clamp_value",
    # attention and residual layout
    "softmax_scale", "rotary_interleaved", "apply_residual_connection_post_layernorm",
    # dropout and initialisation
    "hidden_dropout", "attention_dropout", "init_method_std", "embedding_init_method_std",
})

RUNTIME = frozenset({
    # the parallel layout and precision: set by the job from its keys (job/settings/model_fields.py)
    "tensor_model_parallel_size", "pipeline_model_parallel_size", "sequence_parallel",
    "variable_seq_lengths", "num_layers", "fp16", "bf16", "params_dtype", "pipeline_dtype",
    "enable_autocast", "autocast_dtype", "fp8", "fp8_recipe", "use_cpu_initialization",
    "perform_initialization", "inference_rng_tracker",
    # hooks the job (job/build.py) or Megatron's schedules install: Python objects
    "timers", "finalize_model_grads_func", "grad_scale_func", "no_sync_func", "grad_sync_func",
    "param_sync_func",
    # fused kernels of the same math (megatron/core/fusions/, Transformer Engine)
    "gradient_accumulation_fusion", "cross_entropy_loss_fusion", "cross_entropy_fusion_impl",
    "masked_softmax_fusion", "persist_layer_norm", "memory_efficient_layer_norm", "bias_dropout_fusion",
    "apply_rope_fusion", "fused_single_qkv_rope", "fused_residual_rmsnorm",
    # numerics of the same function: fp32 residual/softmax, QK layer scaling (1/layer in the
    # product, x layer in the softmax: the same scores), FP8 scaling
    "fp32_residual_connection", "apply_query_key_layer_scaling", "attention_softmax_in_fp32",
    "disable_bf16_reduced_precision_matmul", "activation_func_fp8_input_store", "fp8_param", "fp8_margin",
    "fp8_amax_history_len", "fp8_amax_compute_algo", "fp8_wgrad", "fp8_dot_product_attention",
    "fp8_multi_head_attention", "tp_only_amax_red",
    # kernel and implementation choices
    "attention_backend", "flash_attention_version", "transformer_impl",
    "disable_parameter_transpose_cache", "clone_scatter_output_in_embedding", "batch_invariant_mode",
    "deterministic_mode",
    # activation memory
    "recompute_granularity", "recompute_method", "recompute_num_layers", "recompute_modules",
    "distribute_saved_activations", "num_microbatches_with_partial_activation_checkpoints",
    "mlp_chunks_for_training",
    # pipeline messages
    "batch_p2p_comm", "batch_p2p_sync", "use_ring_exchange_p2p", "deallocate_pipeline_outputs",
    # debugging and logging
    "test_mode", "barrier_with_L1_time", "config_logger_dir",
})

_MOE = "mixture of experts is not built by SpiralGPTModel's layer specs"
_GTP = ("generalized tensor parallelism (weight rematerialization) needs process groups that "
        "spiral_megatron.parallel.initialize does not create")
_VPP = "the interleaved (virtual) pipeline schedule is not supported"
_PIPELINE = "SpiralGPTModel partitions the pipeline itself: use model.pipeline_split / model.loop_placement"
_CP = "context parallelism is not supported by SpiralGPTModel; use sequence parallelism"
_ATTN = "SpiralGPTModel's layer specs build standard softmax attention only"
_MTP = "multi-token prediction is not built by SpiralGPTModel"
_GRAPH = "CUDA graphs are not supported with the loop (its modules run T times at different shapes)"
_OFFLOAD = "activation/weight offloading is untested with the loop; use recompute (recompute_granularity)"
_HYBRID = "hybrid (Mamba) models are not built by SpiralGPTModel"
_HETERO = "SpiralGPTModel builds its blocks from one layer spec"
_KITCHEN = "the kitchen quantization backend is not wired into SpiralGPTModel's specs"
_FP4 = "FP4 is not supported with the loop"
_BF16_ENDS = "SpiralGPTModel's layer numbering is per part (prelude, core, coda)"
_INFERENCE = "an option of Megatron's inference engine, which the training job does not run"
_MUP = "SpiralGPTModel does not apply muP's embedding and output multipliers"
_TP_OVERLAP = ("needs Transformer Engine's userbuffers, which Megatron-LM's training initialises "
               "(initialize_tp_communicators) and this job does not")
_QK_CLIP = ("applied and logged by Megatron-LM's training loop after each step "
            "(megatron.core.optimizer.qk_clip), which this job does not run")
_PER_TOKEN = ("the job's loss is the mean over each micro-batch's tokens (job/run/step.py); Megatron's "
              "per-token normalisation over the global batch needs a loss that returns token counts")
_DEFER = "needs GPTModel's embedding activation buffers, which SpiralGPTModel's output layer does not keep"
_DERIVED = ("a Python object that SpiralConfig derives from init_method_std, embedding_init_method_std and "
            "unrolled_output_init (recorded); a callable cannot travel with the model")
_IGNORED = "ignored by megatron-core (deprecated)"


def _each(reason: str, *names: str) -> Dict[str, str]:
    return dict.fromkeys(names, reason)


# field -> why a value other than the default is refused
REFUSED: Dict[str, str] = {
    **_each(_MOE, "num_moe_experts", "expert_model_parallel_size", "expert_tensor_parallel_size",
            "expert_tensor_parallel_num_weight_shards", "expert_gtp_weight_remat_size", "moe_grad_scale_func",
            "overlap_moe_expert_parallel_comm", "delay_wgrad_compute", "overlap_dispatch_backward_with_experts_wgrad",
            "ep_overlap_early_attn_memory_release", "high_priority_a2a_comm_stream",
            "use_fused_weighted_squared_relu", "use_grouped_gemm_for_shared_expert",
            "use_transformer_engine_op_fuser",  # read by the MoE experts and Megatron's GPT specs only
            "moe_shared_expert_intermediate_size", "moe_shared_expert_gate", "moe_shared_expert_overlap",
            "moe_shared_expert_glu_interleave_size", "moe_layer_freq", "moe_ffn_hidden_size",
            "moe_router_load_balancing_type", "moe_router_topk", "moe_enable_routing_replay",
            "moe_router_topk_limited_devices", "moe_router_padding_for_quantization", "moe_router_padding_for_fp8",
            "moe_router_num_groups", "moe_router_group_topk", "moe_router_pre_softmax",
            "moe_router_topk_scaling_factor", "moe_router_score_function", "moe_router_dtype",
            "moe_router_enable_expert_bias", "moe_router_bias_update_rate", "moe_router_quantile_balancing_ema",
            "moe_router_force_load_balancing", "moe_router_force_biased", "moe_grouped_gemm",
            "moe_single_grouped_weight", "moe_single_grouped_bias", "moe_aux_loss_coeff", "moe_z_loss_coeff",
            "moe_input_jitter_eps", "moe_token_dropping", "moe_token_dispatcher_type", "moe_enable_deepep",
            "moe_flex_dispatcher_backend", "moe_permute_fusion_into_hybridep",
            "moe_hybridep_pad_uneven_dispatch_inputs", "moe_per_layer_logging", "moe_expert_capacity_factor",
            "moe_pad_expert_input_to_capacity", "moe_pad_experts_for_cuda_graph_inference",
            "moe_token_drop_policy", "moe_layer_recompute", "moe_permute_fusion", "moe_router_fusion",
            "moe_apply_probs_on_input", "moe_latent_size", "moe_flex_dispatcher_num_sms", "moe_deepep_num_sms",
            "moe_hybridep_num_sms", "moe_hybridep_num_blocks_permute", "moe_hybridep_num_blocks_unpermute",
            "moe_hybridep_num_sms_preprocessing", "moe_ncclep_static_shape", "moe_ncclep_zero_copy",
            "moe_mlp_glu_interleave_size", "moe_expert_rank_capacity_factor", "moe_paged_stash",
            "moe_paged_stash_page_size", "moe_paged_stash_buffer_size_factor_cuda",
            "moe_paged_stash_buffer_size_factor_cpu", "moe_use_legacy_grouped_gemm", "moe_extended_tp"),
    **_each(_GTP, "tensor_parallel_num_weight_shards", "gtp_weight_remat_size"),
    **_each(_VPP, "virtual_pipeline_model_parallel_size", "microbatch_group_size_per_vp_stage",
            "overlap_p2p_comm", "overlap_p2p_comm_warmup_flush"),
    **_each(_PIPELINE, "num_layers_in_first_pipeline_stage", "num_layers_in_last_pipeline_stage",
            "pipeline_model_parallel_layout", "account_for_embedding_in_pipeline_split",
            "account_for_loss_in_pipeline_split"),
    **_each(_CP, "context_parallel_size", "hierarchical_context_parallel_sizes", "hybrid_context_parallel",
            "max_seqlen_per_dp_cp_rank", "cp_comm_type"),
    **_each(_ATTN, "multi_latent_attention", "experimental_attention_variant",
            "experimental_attention_variant_loss_scale_func", "softmax_type", "attention_output_gate",
            "window_size", "window_attn_skip_freq", "no_rope_freq", "mrope_section", "linear_attention_freq",
            "linear_conv_kernel_dim", "linear_key_head_dim", "linear_value_head_dim", "linear_num_key_heads",
            "linear_num_value_heads", "dsa_indexer_n_heads", "dsa_indexer_head_dim", "dsa_indexer_topk",
            "dsa_indexer_topk_freq", "dsa_indexer_skip_topk_offset", "dsa_indexer_loss_coeff",
            "dsa_indexer_use_sparse_loss", "dsa_kernel_backend", "dsa_indexer_rope_interleaved",
            "dsa_indexer_rotate_activation", "dsa_indexer_scoring_relu", "dsa_indexer_k_norm_epsilon",
            "dsa_indexer_k_norm_fp32"),
    **_each(_MTP, "mtp_num_layers", "mtp_standalone", "mtp_loss_scaling_factor", "mtp_use_repeated_layer",
            "mtp_detach_heads", "mtp_hybrid_override_pattern", "mtp_grad_scale_func"),
    **_each(_GRAPH, "enable_cuda_graph", "external_cuda_graph", "cuda_graph_impl", "cuda_graph_modules",
            "cuda_graph_scope", "cuda_graph_use_single_mempool", "cuda_graph_retain_backward_graph",
            "cuda_graph_warmup_steps"),
    **_each(_OFFLOAD, "cpu_offloading", "cpu_offloading_num_layers", "_cpu_offloading_context",
            "cpu_offloading_activations", "cpu_offloading_weights", "cpu_offloading_double_buffering",
            "cpu_offloading_retain_pinned_cpu_buffers", "fine_grained_activation_offloading", "offload_modules",
            "min_offloaded_tensor_size", "delay_offload_until_cuda_graph", "delta_offload_bytes_across_pp_ranks",
            "activation_offload_fraction", "fine_grained_offloading_max_inflight_offloads"),
    **_each(_HYBRID, "is_hybrid_model", "mamba_state_dim", "mamba_head_dim", "mamba_num_groups",
            "mamba_num_heads", "mamba_training_ssm_states_dtype", "use_mamba_mem_eff_path"),
    **_each(_HETERO, "heterogeneous_block_specs", "hetereogenous_dist_checkpoint"),
    **_each(_KITCHEN, "use_kitchen", "use_kitchen_attention", "kitchen_attention_backend", "quant_recipe"),
    **_each(_FP4, "fp4", "fp4_recipe", "fp4_param", "fp4_quantizer_factory"),
    **_each(_BF16_ENDS, "first_last_layers_bf16", "num_layers_at_start_in_bf16", "num_layers_at_end_in_bf16"),
    **_each(_INFERENCE, "use_inference_optimized_layers", "flash_decode", "inference_sampling_seed",
            "nccl_all_reduce_for_prefill", "inference_fuse_tp_communication",
            "inference_disable_triton_nvls_kernels", "inference_grouped_gemm_backend",
            "inference_moe_disable_fused_quant_kernels", "inference_moe_token_dispatcher_type",
            "mlp_chunks_for_prefill", "inference_cuda_graph_scope"),
    **_each(_MUP, "use_mup", "mup_width_mult", "mup_base_hidden_size", "mup_embedding_mult", "mup_output_mult",
            "mup_base_head_dim", "mup_attn_scale_power"),
    **_each(_TP_OVERLAP, "tp_comm_overlap", "tp_comm_bulk_wgrad", "tp_comm_bulk_dgrad", "tp_comm_overlap_ag",
            "tp_comm_overlap_rs", "tp_comm_overlap_rs_dgrad", "tp_comm_split_ag", "tp_comm_atomic_ag",
            "tp_comm_split_rs", "tp_comm_atomic_rs", "tp_comm_overlap_disable_qkv", "tp_comm_overlap_disable_fc1",
            "tp_comm_bootstrap_backend"),
    **_each(_QK_CLIP, "qk_clip", "qk_clip_alpha", "qk_clip_threshold", "log_max_attention_logit"),
    **_each(_DEFER, "defer_embedding_wgrad_compute", "wgrad_deferral_limit"),
    **_each(_DERIVED, "init_method", "output_layer_init_method", "embedding_init_method"),
    **_each(_IGNORED, "fp8_interval", "async_tensor_model_parallel_allreduce"),
    "calculate_per_token_loss": _PER_TOKEN,
    # fields megatron.core's layers never read: Megatron-LM passes them elsewhere
    "use_te_rng_tracker": ("not read by megatron.core's layers: spiral_megatron.parallel.initialize sets up "
                           "the RNG tracker"),
    "pipeline_model_parallel_comm_backend": ("not read by megatron.core's layers: the pipeline's process groups "
                                             "are made by spiral_megatron.parallel.initialize"),
    "use_grouped_gemm_for_dense_mlp": "read by Megatron's GPT layer specs only, not by SpiralGPTModel's",
    "fp8_output_proj": "read by GPTModel's output layer only; SpiralGPTModel's is Megatron's ColumnParallelLinear",
    "fp8_quantizer_factory": "only used by fp8_recipe 'custom', which the job does not accept",
    "init_model_with_meta_device": "only works with Megatron FSDP; the job trains with Megatron DDP",
    "symmetric_ar_type": ("Transformer Engine's symmetric-memory all-reduce is untested with the loop "
                          "(and megatron-core 0.16 fails on it without Transformer Engine)"),
}
