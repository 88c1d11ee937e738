"""The web page ``GET /`` serves: upload or paste an image, type a prompt, see the answer and the masks overlaid
(one checkbox per mask), download the overlay as PNG. One self-contained HTML file, no external resources; it
decodes COCO compressed RLE itself."""

PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>maskport serve</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body{font-family:system-ui,sans-serif;margin:1.5rem;max-width:980px;color:#222}
 h1{font-size:1.3rem;margin:0 0 .2rem} .sub{color:#666;margin:0 0 1rem;font-size:.9rem}
 fieldset{border:1px solid #ccc;border-radius:6px;padding:.8rem;margin-bottom:1rem}
 label{display:block;margin:.35rem 0 .15rem;font-size:.9rem}
 textarea,input[type=text],input[type=password]{width:100%;box-sizing:border-box;font:inherit;padding:.35rem}
 #drop{border:2px dashed #aaa;border-radius:6px;padding:.8rem;text-align:center;color:#555;margin:.4rem 0}
 button{font:inherit;padding:.4rem 1rem;margin-right:.5rem;cursor:pointer}
 #view{width:512px;max-width:100%;border:1px solid #ccc;image-rendering:pixelated;display:block;margin-top:.5rem}
 #answer{font-family:ui-monospace,monospace;background:#f4f4f4;padding:.5rem;border-radius:4px;min-height:1.2rem;white-space:pre-wrap}
 #status{color:#555;font-size:.85rem;margin:.4rem 0} #status.err{color:#b00020}
 .mask{display:inline-flex;align-items:center;margin:.2rem .8rem .2rem 0} .sw{width:14px;height:14px;display:inline-block;margin:0 .3rem;border:1px solid #333}
 .row{display:flex;gap:1rem;flex-wrap:wrap} .row>div{flex:1;min-width:160px}
</style></head>
<body>
<h1>maskport serve</h1>
<p class="sub" id="model">loading model info...</p>
<fieldset>
 <label for="file">Image (choose a file, drop it here, or paste with Ctrl+V)</label>
 <input type="file" id="file" accept="image/*">
 <div id="drop">drop or paste an image</div>
 <label for="prompt">Prompt</label>
 <textarea id="prompt" rows="2">Please segment the object.</textarea>
 <div class="row">
  <div><label for="threshold">Mask threshold (0-1, empty: the model's)</label><input type="text" id="threshold" value=""></div>
  <div><label for="maxnew">Max new tokens</label><input type="text" id="maxnew" value="64"></div>
  <div><label for="apikey">API key (if the server needs one)</label><input type="password" id="apikey" value=""></div>
 </div>
 <p><button id="go">Segment</button><button id="download" disabled>Download PNG</button></p>
 <div id="status"></div>
</fieldset>
<label>Answer</label><div id="answer"></div>
<div id="masks"></div>
<canvas id="view" width="1" height="1"></canvas>
<script>
"use strict";
const COLORS=[[0,120,255],[255,48,48],[40,200,80],[255,190,0],[200,60,255],[0,210,210],[255,120,200],[140,90,40]];
let img=null, imgBlob=null, masks=[], shown=[];
const $=id=>document.getElementById(id);
const key=$("apikey"); key.value=localStorage.getItem("maskport-api-key")||"";
function headers(){const h={}; if(key.value) h["Authorization"]="Bearer "+key.value; return h;}
function status(t,err){const s=$("status"); s.textContent=t; s.className=err?"err":"";}
fetch("v1/model",{headers:headers()}).then(r=>r.json()).then(j=>{
  $("model").textContent=j.error?("model info: "+j.error):(j.family+" - "+j.export+" - "+j.dtype+(j.quantization?(" - "+j.quantization.method+" "+j.quantization.bits+"-bit"):"")+" - on "+j.replicas.join(", "));
}).catch(e=>{$("model").textContent="model info unavailable";});
function decodeCounts(s){ // COCO compressed RLE string -> run lengths
  const c=[]; let p=0;
  while(p<s.length){let x=0,k=0,more=1;
    while(more){const ch=s.charCodeAt(p)-48; x|=(ch&31)<<(5*k); more=ch&32; p++; k++; if(!more&&(ch&16)) x|=-1<<(5*k);}
    if(c.length>2) x+=c[c.length-2]; c.push(x);}
  return c;
}
function decodeMask(m){ // -> Uint8Array, row-major H*W
  const [h,w]=m.size, out=new Uint8Array(h*w), runs=decodeCounts(m.counts); let i=0,v=0;
  for(const r of runs){ if(v){ for(let j=i;j<i+r;j++){const x=Math.floor(j/h), y=j-x*h; out[y*w+x]=1;} } i+=r; v^=1; }
  return out;
}
function draw(){
  const cv=$("view"), ctx=cv.getContext("2d");
  if(!img){cv.width=1;cv.height=1;return;}
  cv.width=img.naturalWidth; cv.height=img.naturalHeight; ctx.drawImage(img,0,0);
  if(!masks.length) return;
  const d=ctx.getImageData(0,0,cv.width,cv.height), px=d.data;
  masks.forEach((m,k)=>{ if(!shown[k]||m.size[0]!==cv.height||m.size[1]!==cv.width) return;
    const c=COLORS[k%COLORS.length];
    for(let i=0;i<m.bits.length;i++) if(m.bits[i]){const o=4*i; px[o]=(px[o]+c[0])>>1; px[o+1]=(px[o+1]+c[1])>>1; px[o+2]=(px[o+2]+c[2])>>1;}
  });
  ctx.putImageData(d,0,0);
}
function setImage(blob){
  imgBlob=blob; masks=[]; shown=[]; $("masks").innerHTML=""; $("answer").textContent=""; $("download").disabled=true;
  const im=new Image(); im.onload=()=>{img=im; draw(); status("image "+im.naturalWidth+" x "+im.naturalHeight);};
  im.onerror=()=>status("that file is not an image the browser can show",true);
  im.src=URL.createObjectURL(blob);
}
$("file").addEventListener("change",e=>{ if(e.target.files[0]) setImage(e.target.files[0]); });
const drop=$("drop");
drop.addEventListener("dragover",e=>e.preventDefault());
drop.addEventListener("drop",e=>{e.preventDefault(); const f=e.dataTransfer.files[0]; if(f) setImage(f);});
document.addEventListener("paste",e=>{ for(const it of (e.clipboardData||{}).items||[]) if(it.type.startsWith("image/")){ setImage(it.getAsFile()); e.preventDefault(); return; } });
function renderMasks(){
  const box=$("masks"); box.innerHTML="";
  masks.forEach((m,k)=>{ const c=COLORS[k%COLORS.length], l=document.createElement("label"); l.className="mask";
    const cb=document.createElement("input"); cb.type="checkbox"; cb.checked=true; cb.id="mask-"+k;
    cb.addEventListener("change",()=>{shown[k]=cb.checked; draw();});
    const sw=document.createElement("span"); sw.className="sw"; sw.style.background="rgb("+c.join(",")+")";
    l.append(cb,sw,document.createTextNode("mask "+m.seg_index+" ("+m.area+" px)")); box.append(l); });
  if(!masks.length) box.textContent="no masks in this answer";
}
$("go").addEventListener("click",async()=>{
  localStorage.setItem("maskport-api-key",key.value);
  const fd=new FormData(); if(imgBlob) fd.append("image",imgBlob,"image");
  fd.append("prompt",$("prompt").value);
  if($("threshold").value.trim()) fd.append("threshold",$("threshold").value.trim());
  if($("maxnew").value.trim()) fd.append("max_new_tokens",$("maxnew").value.trim());
  status("segmenting..."); $("go").disabled=true;
  try{
    const r=await fetch("v1/segment",{method:"POST",body:fd,headers:headers()}); const j=await r.json();
    if(!r.ok){status("error "+r.status+": "+j.error,true); return;}
    $("answer").textContent=j.prediction;
    masks=j.masks.map(m=>{const bits=decodeMask(m); let a=0; for(const b of bits) a+=b; return Object.assign({bits:bits,area:a},m);});
    shown=masks.map(()=>true); renderMasks(); draw(); $("download").disabled=!img;
    status(masks.length+" mask(s); "+j.timings.total_ms.toFixed(0)+" ms (batch of "+j.timings.batch_size+")");
  }catch(e){status("request failed: "+e,true);} finally{$("go").disabled=false;}
});
$("download").addEventListener("click",()=>{ $("view").toBlob(b=>{const a=document.createElement("a"); a.href=URL.createObjectURL(b); a.download="maskport-segmentation.png"; document.body.append(a); a.click(); a.remove();},"image/png"); });
</script>
</body></html>
"""
