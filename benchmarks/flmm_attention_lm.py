"""F-LMM attention rows at the LLaVA-1.5-7B language-model shape (Llama-7B: 32 layers x 32 heads, bf16, random
weights), text model only: eager attention with ``output_attentions=True`` + ``output_hidden_states=True`` (F-LMM's
way) against a registered sdpa attention that also computes the softmax rows of 8 phrase tokens over 576 image
columns (positions 31..606), the method of the export's ``AttentionRowsRecorder`` restated compactly (the device
machine receives a command line only, not this working tree). Peak GPU memory above the loaded model, median of 3
forwards, largest difference between the two paths' rows. Prints one JSON line per sequence length.

    python benchmarks/flmm_attention_lm.py

``benchmarks/flmm_attention.py`` is the full version (LLaVA with its vision tower, the export's own code).
"""
import torch,time,json,torch.nn.functional as F
from transformers import LlamaConfig,LlamaModel,AttentionInterface
from transformers.masking_utils import AttentionMaskInterface,sdpa_mask
from transformers.integrations.sdpa_attention import sdpa_attention_forward as sd
R={}
def rows_attn(m,q,k,v,am,dropout=0.0,scaling=None,**kw):
 r=R.get('r')
 if r is not None:
  qq=q[:,:,r];s=torch.matmul(qq,k.transpose(2,3))*scaling
  vis=torch.arange(k.shape[2],device=q.device)[None]<=r[:,None]
  s=s.masked_fill(~vis[None,None],torch.finfo(s.dtype).min)
  R[m.layer_idx]=F.softmax(s,-1,dtype=torch.float32).to(q.dtype)[...,R['c']]
 return sd(m,q,k,v,am,dropout=dropout,scaling=scaling,**kw)
AttentionInterface.register('rows',rows_attn);AttentionMaskInterface.register('rows',sdpa_mask)
c=LlamaConfig(vocab_size=32064,hidden_size=4096,intermediate_size=11008,num_hidden_layers=32,num_attention_heads=32,num_key_value_heads=32)
c._attn_implementation='sdpa'
with torch.device('cuda'):m=LlamaModel(c).to(torch.bfloat16).eval()
torch.cuda.synchronize();base=torch.cuda.memory_allocated();out=[]
for S in (640,1600,3000):
 x=torch.randn(1,S,4096,device='cuda',dtype=torch.bfloat16);rows=torch.arange(S-8,S,device='cuda');cols=torch.arange(31,607,device='cuda')
 def eager():
  m.config._attn_implementation_internal='eager'
  o=m(inputs_embeds=x,output_attentions=True,output_hidden_states=True,use_cache=False)
  m.config._attn_implementation_internal='sdpa'
  return torch.stack([a[0][:,rows][...,cols] for a in o.attentions])
 def rw():
  R.clear();R['r']=rows;R['c']=cols;m.config._attn_implementation_internal='rows'
  m(inputs_embeds=x,use_cache=False);m.config._attn_implementation_internal='sdpa';R['r']=None
  return torch.stack([R[i][0] for i in range(32)])
 p={'seq':S}
 with torch.no_grad():
  for n,f in(('eager',eager),('rows',rw)):
   f();torch.cuda.synchronize();torch.cuda.empty_cache();torch.cuda.reset_peak_memory_stats();t=[]
   for _ in range(3):
    torch.cuda.synchronize();t0=time.perf_counter();f();torch.cuda.synchronize();t.append(time.perf_counter()-t0)
   p[n+'_peak_gib']=(torch.cuda.max_memory_allocated()-base)/2**30;p[n+'_s']=sorted(t)[1]
  p['maxdiff']=float((eager().float()-rw().float()).abs().max())
 out.append(p);print(json.dumps(p),flush=True)
